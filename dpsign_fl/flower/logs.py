"""Log lines a user can read in a terminal and in a file.

Flower's console handler colours every line with ANSI codes, which end up as
``^[[92m`` in log files and in ``flwr log`` output saved to disk. The apps call
:func:`plain_logs` once: colours stay on a terminal, and only there.

Text that came from a client (an error reason, a rejected reply's keys) goes
through :func:`printable` before it reaches a log line, an exception or a
results file: a reply must not be able to draw its own log lines (a fake green
``INFO round 9: accuracy 0.999``), move the cursor, or fill the disk.
"""

from __future__ import annotations

import logging
import unicodedata

from flwr.common.logger import update_console_handler

CLIENT_TEXT_LIMIT = 300
"""Characters of client text shown in one log line, exception or results file."""

_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Unicode categories escaped by printable: C0, DEL and C1 controls (ESC, CR, LF...), format
characters (bidi overrides, zero-width), lone surrogates, line and paragraph separators."""


def plain_logs() -> None:
    """Colour Flower's log lines only when they go to a terminal."""
    handlers = logging.getLogger("flwr").handlers
    to_terminal = all(getattr(getattr(h, "stream", None), "isatty", lambda: False)() for h in handlers) if handlers else False
    update_console_handler(colored=to_terminal)


def printable(text: str, limit: int = CLIENT_TEXT_LIMIT) -> str:
    """``text`` on one line of at most ``limit`` characters, with nothing a terminal acts on.

    Every control or format character becomes its escape (``ESC`` -> ``\\x1b``,
    a newline -> ``\\n``), so an ANSI sequence shows as text instead of
    colouring or moving anything; longer text is cut and ends in ``...``.
    Only the first ``limit + 1`` characters are read, so a megabyte costs
    nothing.

    Args:
        text: text from a client (anything else is converted with ``str``).
        limit: the most characters returned, >= 4.

    Returns:
        The escaped, bounded text.

    Raises:
        ValueError: if ``limit`` is not an integer >= 4.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 4:
        raise ValueError(f"limit must be an integer >= 4, got {limit!r}")
    if not isinstance(text, str):
        text = str(text)
    shown = "".join(_escaped(char) for char in text[: limit + 1])
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _escaped(char: str) -> str:
    if unicodedata.category(char) not in _UNPRINTABLE:
        return char
    return char.encode("unicode_escape", "backslashreplace").decode("ascii")

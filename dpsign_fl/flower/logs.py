"""Log lines a user can read in a terminal and in a file.

Flower's console handler colours every line with ANSI codes, which end up as
``^[[92m`` in log files and in ``flwr log`` output saved to disk. The apps call
:func:`plain_logs` once: colours stay on a terminal, and only there.
"""

from __future__ import annotations

import logging

from flwr.common.logger import update_console_handler


def plain_logs() -> None:
    """Colour Flower's log lines only when they go to a terminal."""
    handlers = logging.getLogger("flwr").handlers
    to_terminal = all(getattr(getattr(h, "stream", None), "isatty", lambda: False)() for h in handlers) if handlers else False
    update_console_handler(colored=to_terminal)

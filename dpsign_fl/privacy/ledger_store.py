"""A client's privacy ledger kept in a file on its device, durable across restarts.

In deployment the ClientApp runs in a fresh process per message and a
SuperNode can be restarted at any time; Flower's ``context.state`` lives only
as long as the SuperNode and the run. A budget kept only there would silently
reset (docs/privacy.md). The file is therefore the source of truth:

- it holds :meth:`PrivacyLedger.to_dict` as JSON and nothing about runs or
  targets: every release ever made from one dataset composes, whatever run
  it belonged to, so there is **one ledger file per dataset on the device**,
  deleted only when the data itself is replaced by data nobody has released
  anything about;
- :func:`write_ledger_file` replaces it atomically (temporary file in the same
  folder, fsync, rename, fsync of the folder), so a crash leaves either the
  old or the new ledger, never a torn one;
- :func:`read_ledger_file` refuses a file it cannot read as a ledger instead
  of starting a fresh one (that would reset the budget);
- :func:`lock_ledger_file` serialises the processes that use one file (two
  runs on one SuperNode, or two SuperNodes sharing a dataset) with an
  exclusive ``fcntl.flock`` on a sibling ``<file>.lock``, so that two of them
  cannot both spend the last of the budget. POSIX only.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..atomic_file import write_atomic
from .ledger import PrivacyLedger

LOCK_SUFFIX = ".lock"
DEFAULT_LOCK_TIMEOUT_SECONDS = 600.0
_LOCK_POLL_SECONDS = 0.05


class LedgerFileError(ValueError):
    """A ledger file that cannot be used; the message names the file and why."""


def read_ledger_file(path: str | Path, *, accountant: str) -> PrivacyLedger:
    """Return the ledger stored at ``path``, or an empty one if the file does not exist.

    The releases are read from the file; ``accountant`` only chooses how their
    epsilon is computed (PLD and RDP both bound the same releases).

    Args:
        path: the ledger file (absolute; see :func:`check_ledger_path`).
        accountant: ``"pld"`` or ``"rdp"``.

    Returns:
        The stored :class:`PrivacyLedger`, or an empty one for a missing file.

    Raises:
        LedgerFileError: if the file exists but is not a ledger (empty,
            truncated, not JSON, another format version). Starting afresh
            would reset the budget, so this is never silently repaired.
    """
    path = check_ledger_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return PrivacyLedger(accountant=accountant)
    try:
        stored = PrivacyLedger.from_dict(json.loads(text))
    except (json.JSONDecodeError, ValueError) as error:
        raise LedgerFileError(
            f"ledger file {str(path)!r} is not a privacy ledger ({error}); refusing to start a new "
            "budget over it: restore it from a backup, or delete it only if the data was replaced"
        ) from None
    return PrivacyLedger(stored.releases, accountant=accountant)


def write_ledger_file(path: str | Path, ledger: PrivacyLedger) -> None:
    """Replace the ledger file at ``path`` with ``ledger``, atomically and durably.

    Writes a temporary file in the same folder, fsyncs it, renames it over
    ``path`` (atomic on POSIX) and fsyncs the folder, so that the rename itself
    survives a power loss.

    Raises:
        LedgerFileError: if the folder of ``path`` does not exist.
        OSError: if the file cannot be written; the old ledger is then intact.
    """
    path = check_ledger_path(path)
    write_atomic(path, json.dumps(ledger.to_dict(), indent=1).encode("utf-8"))


@contextmanager
def lock_ledger_file(path: str | Path, *, timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
    """Hold an exclusive lock on the ledger at ``path`` for the ``with`` block.

    Hold it from reading the ledger to writing the new one, so that every
    budget check sees every earlier release. The lock is ``fcntl.flock`` on
    ``<path>.lock`` (the ledger itself is replaced by rename, so it cannot
    carry the lock); the kernel drops it if the process dies.

    Args:
        path: the ledger file.
        timeout_seconds: how long to wait for another holder, > 0.

    Raises:
        TimeoutError: if the lock is still held by another process after
            ``timeout_seconds``.
        LedgerFileError: if the folder of ``path`` does not exist.
    """
    import fcntl  # POSIX only: imported here so that the module loads everywhere

    path = check_ledger_path(path)
    if not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    with open(lock_path, "a", encoding="utf-8") as handle:
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"ledger file {str(path)!r} stayed locked by another process for "
                        f"{timeout_seconds:g} s ({str(lock_path)!r})"
                    ) from None
                time.sleep(_LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_ledger_path(path: str | Path) -> Path:
    """Return ``path`` (``~`` expanded) if it can name a ledger file.

    A relative path would depend on the directory the SuperNode was started
    from, and a path into a missing folder is most likely a typo: both would
    silently start a fresh budget, so both are refused.

    Raises:
        TypeError: if ``path`` is not a string or a Path.
        LedgerFileError: if it is empty, relative, a folder, or in a folder that
            does not exist.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"ledger path must be a string or a Path, got {type(path).__name__}")
    if str(path) == "":
        raise LedgerFileError("ledger path must not be empty")
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        raise LedgerFileError(f"ledger path must be absolute, got {str(path)!r}")
    if resolved.is_dir():
        raise LedgerFileError(f"ledger path must name a file, got the folder {str(resolved)!r}")
    if not resolved.parent.is_dir():
        raise LedgerFileError(
            f"ledger path {str(resolved)!r} is in a folder that does not exist; create {str(resolved.parent)!r} first"
        )
    return resolved


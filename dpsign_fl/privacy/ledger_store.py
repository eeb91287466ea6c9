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
  cannot both spend the last of the budget. The lock is fair: a process that
  releases it and asks again queues behind those already waiting (a turnstile,
  ``<file>.gate``). Temporary files that a killed writer left are removed
  under the lock. POSIX only.
- The path is the real file: a symbolic link is followed (and the lock taken
  next to its target); a dangling link, or a file with more than one hard
  link, is refused: writing it would split the budget in two.
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from ..atomic_file import temporary_files, write_atomic
from .ledger import PrivacyLedger

LOCK_SUFFIX = ".lock"
GATE_SUFFIX = ".gate"
DEFAULT_LOCK_TIMEOUT_SECONDS = 600.0
_LOCK_POLL_SECONDS = 0.01


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
    """Hold an exclusive, fair lock on the ledger at ``path`` for the ``with`` block.

    Hold it from reading the ledger to writing the new one, so that every
    budget check sees every earlier release. The lock is ``fcntl.flock`` on
    ``<file>.lock`` (the ledger itself is replaced by rename, so it cannot carry
    the lock); the kernel drops it if the process dies. To get it a process
    first passes a turnstile, ``<file>.gate``, which it holds while it waits:
    a holder that lets go and asks again must wait for the gate, so the
    process already waiting gets the lock first (no starvation). Under the
    lock, temporary files a killed writer left behind are removed.

    Args:
        path: the ledger file (a symbolic link is followed).
        timeout_seconds: how long to wait for other holders, > 0.

    Raises:
        TimeoutError: if the lock is still held by others after ``timeout_seconds``.
        LedgerFileError: as :func:`check_ledger_path`.
    """
    import fcntl  # POSIX only: imported here so that the module loads everywhere

    path = check_ledger_path(path)
    if not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
    deadline = time.monotonic() + timeout_seconds
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    gate_path = path.with_name(path.name + GATE_SUFFIX)
    with open(gate_path, "a", encoding="utf-8") as gate, open(lock_path, "a", encoding="utf-8") as lock:
        _acquire(fcntl, gate, deadline, path, gate_path, timeout_seconds)
        try:
            _acquire(fcntl, lock, deadline, path, lock_path, timeout_seconds)
        finally:
            fcntl.flock(gate.fileno(), fcntl.LOCK_UN)
        try:
            for leftover in temporary_files(path):
                leftover.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _acquire(fcntl, handle: IO, deadline: float, path: Path, lock_path: Path, timeout_seconds: float) -> None:
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"ledger file {str(path)!r} stayed locked by another process for "
                    f"{timeout_seconds:g} s ({str(lock_path)!r})"
                ) from None
            # Jitter, so that waiters polling the gate do not move in lock step.
            time.sleep(_LOCK_POLL_SECONDS * (0.5 + random.random()))


def check_ledger_path(path: str | Path) -> Path:
    """Return the real file behind ``path`` (``~`` expanded, links followed) if it can hold a ledger.

    A relative path would depend on the directory the SuperNode was started
    from, and a path into a missing folder is most likely a typo: both would
    silently start a fresh budget, so both are refused. So are a dangling
    symbolic link (reading it as "no ledger yet" would reset the budget) and a
    file with other hard links (the atomic rename would replace only this name,
    leaving the other with the old, smaller history).

    Raises:
        TypeError: if ``path`` is not a string or a Path.
        LedgerFileError: if it is empty, relative, a folder, in a folder that
            does not exist, a dangling link, or a file with several hard links.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"ledger path must be a string or a Path, got {type(path).__name__}")
    if str(path) == "":
        raise LedgerFileError("ledger path must not be empty")
    given = Path(path).expanduser()
    if not given.is_absolute():
        raise LedgerFileError(f"ledger path must be absolute, got {str(path)!r}")
    if given.is_symlink() and not given.exists():
        raise LedgerFileError(
            f"ledger path {str(given)!r} is a symbolic link to {os.readlink(given)!r}, which does not exist: "
            "refusing to start a new budget there; point ledger-path at the real ledger file"
        )
    resolved = Path(os.path.realpath(given))
    if resolved.is_dir():
        raise LedgerFileError(f"ledger path must name a file, got the folder {str(resolved)!r}")
    if not resolved.parent.is_dir():
        raise LedgerFileError(
            f"ledger path {str(resolved)!r} is in a folder that does not exist; create {str(resolved.parent)!r} first"
        )
    if resolved.exists() and resolved.stat().st_nlink > 1:
        raise LedgerFileError(
            f"ledger file {str(resolved)!r} has {resolved.stat().st_nlink} hard links: a write would give this name "
            "a new file and leave the others with the old history; keep one name per ledger (a symbolic link is fine)"
        )
    return resolved

"""The folder where dpsign-fl keeps what it computes once per machine (features, the compiled vote kernel).

What is in it is trusted: the compiled vote kernel is loaded as code into the
process that counts the votes (the ServerApp, perhaps run as root), and cached
features are what a model trains on. So another user must not be able to put
a file there, nor swap the folder for one of theirs:
:func:`trusted_cache_dir` hands out a folder only if nobody but this user and
root can change it or any folder above it, and :func:`open_cached_file` opens a
file in it only if it is a regular file of this user or root, writable by
nobody else, never through a link. Root is trusted like the user because root
can replace anything of the user's anyway (as OpenSSH's ``StrictModes`` does).

A folder that fails is not used: one warning names it and why, and the caller
keeps what it computes to this process (the vote kernel is compiled again in
every process, in a private temporary folder; features are not cached).
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("dpsign_fl")

CACHE_ENV = "DPSIGN_FL_CACHE"
"""Environment variable naming the cache folder."""

_GROUP_OR_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def cache_dir() -> Path:
    """``$DPSIGN_FL_CACHE``, else ``$XDG_CACHE_HOME/dpsign-fl``, else ``~/.cache/dpsign-fl`` (not checked: see :func:`trusted_cache_dir`)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dpsign-fl"


def trusted_cache_dir(name: str) -> Path | None:
    """``cache_dir() / name``, created if missing (mode 0o700), if only this user and root can change it.

    Links in the configured path are resolved; the resolved path is then
    checked from the root down (``lstat``, so a link swapped in meanwhile is
    refused): every folder is a real folder owned by this user or root, the
    cache folder and ``name`` are writable by nobody else, and the folders
    above them only with the sticky bit (as ``/tmp``: nobody can rename
    another's entry there). Where ownership and modes do not exist (Windows),
    the folder is used unchecked: the user profile's access lists keep it private.

    Args:
        name: one subfolder, e.g. ``"vote-kernel"``.

    Returns:
        The resolved folder, or None if it fails a check or cannot be created
        (warned once per folder and reason).
    """
    folder = cache_dir() / name
    if os.name != "posix":
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            _warn_refused(str(folder), f"it cannot be created ({error})")
            return None
        return folder
    try:
        # Nothing is created inside a folder that fails: check what exists, create the rest, check again.
        existing = next(path for path in (folder, *folder.parents) if os.path.lexists(path))
        private = {Path(os.path.realpath(folder)), Path(os.path.realpath(cache_dir()))}
        reason = _chain_refusal(Path(os.path.realpath(existing)), private)
        if not reason:
            _make_private_folders(folder, existing)
            resolved = Path(os.path.realpath(folder))
            reason = _chain_refusal(resolved, private | {resolved})
    except OSError as error:
        reason = f"it cannot be created or inspected ({error})"
    if reason:
        _warn_refused(str(folder), reason)
        return None
    return resolved


def open_cached_file(path: str | Path) -> BinaryIO:
    """Open a file of a :func:`trusted_cache_dir` folder for reading, never through a link.

    Check and read go through the same descriptor (``O_NOFOLLOW``, then
    ``fstat``), so what is read is what was checked.

    Raises:
        FileNotFoundError: if there is no such file.
        PermissionError: if it is a link, not a regular file, owned by another
            user than this one or root, or writable by group or others.
        OSError: if it cannot be read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if os.path.islink(path):  # O_NOFOLLOW's ELOOP (Linux) or EMLINK (BSD)
            raise PermissionError(f"{path} is a symbolic link") from error
        raise
    try:
        reason = _refusal(os.fstat(descriptor), "file") if os.name == "posix" else ""
        if reason:
            raise PermissionError(f"{path} {reason}")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _make_private_folders(folder: Path, existing: Path) -> None:
    """Create the folders from below ``existing`` down to ``folder``, each with mode 0o700 (``mkdir -p`` would use the umask's)."""
    lineage = [folder, *folder.parents]
    for path in reversed(lineage[: lineage.index(existing)]):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # made meanwhile, by another process or user: the checks decide
            pass


def _chain_refusal(folder: Path, private: set[Path]) -> str:
    """Why ``folder`` (absolute, resolved) is not to be trusted, or "" if it is; ``private`` folders may not be sticky-writable."""
    for path in (folder, *folder.parents):
        reason = _refusal(os.lstat(path), "folder", sticky_allowed=path not in private)
        if reason:
            return f"{path} {reason}"
    return ""


def _refusal(status: os.stat_result, kind: str, *, sticky_allowed: bool = False) -> str:
    """The one ownership and mode check for cache folders and files: why not to trust them, or ""."""
    mode, uid = status.st_mode, os.getuid()
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if not (stat.S_ISDIR(mode) if kind == "folder" else stat.S_ISREG(mode)):
        return f"is not a {'folder' if kind == 'folder' else 'regular file'}"
    if status.st_uid not in (uid, 0):
        return f"is owned by uid {status.st_uid}, neither this user (uid {uid}) nor root"
    if mode & _GROUP_OR_OTHERS_WRITE and not (sticky_allowed and mode & stat.S_ISVTX):
        return f"is writable by group or others (mode {stat.S_IMODE(mode):o})"
    return ""


@functools.lru_cache(maxsize=None)
def _warn_refused(folder: str, reason: str) -> None:
    log.warning(
        "dpsign-fl does not use the cache folder %s: %s; what it would cache is computed again in every "
        "process (make it and the folders above it writable by this user alone, or set %s to another "
        "folder)", folder, reason, CACHE_ENV,
    )

"""Durable, atomic file writes (the one implementation for ledgers, checkpoints and results) and strict JSON."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never a mix.

    Writes a temporary file in the same folder, fsyncs it, renames it over
    ``path`` (atomic on POSIX), then fsyncs the folder so the rename is durable.

    Raises:
        OSError: if the file cannot be written; ``path`` is then unchanged.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=_TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


_TEMPORARY_SUFFIX = ".tmp"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def temporary_files(path: str | Path) -> list[Path]:
    """The temporary files :func:`write_atomic` makes for ``path`` (left behind only by a killed writer)."""
    path = Path(path)
    prefix = _temporary_prefix(path)
    return [p for p in path.parent.glob(f"{prefix}*{_TEMPORARY_SUFFIX}") if p.name.startswith(prefix)]


def fsync_folder(folder: str | Path) -> None:
    """fsync a folder so that a rename in it is durable (a no-op where unsupported)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json_atomic(path: str | Path, data) -> None:
    """Write ``data`` as strict JSON to ``path`` atomically (:func:`write_atomic`), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(json_safe(data), indent=2).encode("utf-8"))


def json_safe(value):
    """Return ``value`` as strict JSON data: numpy scalars as Python numbers,
    non-finite floats as None, dict keys as strings, tuples as lists."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value

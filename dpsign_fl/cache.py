"""The folder where dpsign-fl keeps what it computes once per machine (features, the compiled vote kernel)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DPSIGN_FL_CACHE"
"""Environment variable naming the cache folder."""


def cache_dir() -> Path:
    """``$DPSIGN_FL_CACHE``, else ``$XDG_CACHE_HOME/dpsign-fl``, else ``~/.cache/dpsign-fl``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dpsign-fl"

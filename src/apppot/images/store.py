"""Where AppPot keeps its images: the user's cache (XDG)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/apppot, or ~/.cache/apppot."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "apppot"


def images_dir() -> Path:
    return cache_dir() / "images"

"""Facts about this host that cost time to measure and rarely change, cached in the user's cache.

Each fact is a small JSON object stored under a key made of what it depends on
(a binary's path, size and mtime; the host's name and CPU), so a changed input
simply makes a new entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from apppot.images.store import cache_dir

T = TypeVar("T", bound=dict[str, Any])


def file_identity(path: Path) -> str:
    """A cache key part for a file: its real path, size and mtime, so a changed file is a new key."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def cached(kind: str, key: list[str], compute: Callable[[], T]) -> T:
    """compute()'s result for this key, from the cache if it is there."""
    full_key = "\0".join(key)
    # A short name is enough: the entry holds its whole key, and a mismatch is recomputed.
    path = cache_dir() / "host" / f"{kind}-{zlib.crc32(full_key.encode()):08x}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        entry = json.loads(path.read_text())
        if entry["key"] == full_key:
            data: T = entry["value"]
            return data
    value = compute()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": full_key, "value": value}))
        tmp.replace(path)
    return value

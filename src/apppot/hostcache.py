"""Facts about this host that cost time to measure and rarely change, cached in the user's cache.

Each fact is a small JSON object stored under a key made of what it depends on
(a binary's path, size and mtime; the host's name and CPU), so a changed input
simply makes a new entry.

The cache may be another user's (root using a user's cache: `sudo env XDG_CACHE_HOME=$HOME/.cache ...`),
so what is in it is hostile input: read_record and write_record, which every small record in the cache
goes through, take a link, FIFO, device, huge file or a third user's file for no record, and never write
through a name someone else could have planted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from apppot.bounded import read_at_most
from apppot.images.store import cache_dir, cache_owner, replace_file

T = TypeVar("T", bound=dict[str, Any])


def file_identity(path: Path) -> str:
    """A cache key part for a file: its real path, size and mtime, so a changed file is a new key."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def cached(kind: str, key: list[str], compute: Callable[[], T], own_only: bool = False) -> T:
    """compute()'s result for this key, from the cache if it is there. ``own_only``: only from an entry this
    effective uid wrote (for a value a decision rests on: root in a user's cache then computes every time)."""
    full_key = "\0".join(key)
    # A short name is enough: the entry holds its whole key, and a mismatch is recomputed.
    path = cache_dir() / "host" / f"{kind}-{zlib.crc32(full_key.encode()):08x}.json"
    entry = read_json(path, own_only)
    if isinstance(entry, dict) and entry.get("key") == full_key and isinstance(entry.get("value"), dict):
        data: T = entry["value"]
        return data
    value = compute()
    with contextlib.suppress(OSError):
        write_record(path, json.dumps({"key": full_key, "value": value}).encode())
    return value


RECORD_LIMIT = 64 * 1024  # every record AppPot writes in its cache is far smaller


def read_record(path: Path, limit: int = RECORD_LIMIT, own_only: bool = False) -> bytes | None:
    """The bytes of a record in the cache, or None when it is not there or not one: not a regular file
    (a link, FIFO, device), over ``limit`` bytes, or owned by neither us nor the owner of its directory
    (``own_only``: not owned by us)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None  # not even opened: opening a device can do something
        trusted = {os.geteuid()} if own_only else {os.geteuid(), os.lstat(path.parent).st_uid}
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit or st.st_uid not in trusted:
            return None
        return read_at_most(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_json(path: Path, own_only: bool = False) -> Any:
    """The JSON value of a record in the cache (read_record), or None."""
    data = read_record(path, own_only=own_only)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def write_record(path: Path, data: bytes) -> None:
    """Replace a record in the cache in one rename, from a file made new (O_EXCL, a name no one can
    guess), so no planted link is followed. Root keeps no records in another user's cache: that user
    could swap a directory on the way for a link between any check and the write."""
    if cache_owner(path.parent) is not None:
        raise PermissionError(errno.EACCES, f"root keeps no records in another user's cache ({path.parent})")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(path.parent).st_mode):
        raise NotADirectoryError(f"{path.parent} is not a directory")
    replace_file(path, data)

"""An image's content id (sha256 of its bytes), measured once per version of the file.

Hashing a 2 GiB appliance takes seconds; a job start must not. The id is cached in the user's host
cache under what a user cannot put back after changing the file: its device, inode, size, and its
mtime and ctime in nanoseconds (ctime cannot be set, and any write or chmod moves it). File times
move in clock ticks, not nanoseconds, so a file changed within the last seconds is not cached: a second
change in the same tick would keep every part of the key (git's "racy" files).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from apppot import hostcache

CACHE_KIND = "content-id"
SETTLED_NS = 2_000_000_000  # a file whose ctime is this close to now is hashed, never cached


def _identity(st: os.stat_result) -> list[str]:
    return [str(st.st_dev), str(st.st_ino), str(st.st_size), str(st.st_mtime_ns), str(st.st_ctime_ns)]


def _hash_open_file(fd: int) -> str:
    h = hashlib.sha256()
    while block := os.read(fd, 1 << 20):
        h.update(block)
    return h.hexdigest()


def content_id(path: Path) -> str:
    """sha256 of the file's bytes, from the cache when this very version of the file was hashed before.
    The file is opened once and both the key and the hash come from that open file; a file changed while
    it was hashed, or changed in the last seconds, is not cached. Raises OSError when the file cannot be read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        key = _identity(before)
        measured: dict[str, str] = {}

        def measure() -> dict[str, str]:
            measured["id"] = _hash_open_file(fd)
            if _identity(os.fstat(fd)) != key or time.time_ns() - before.st_ctime_ns < SETTLED_NS:
                raise _Changed(measured["id"])
            return {"sha256": measured["id"]}

        try:
            value = hostcache.cached(CACHE_KIND, key, measure)
        except _Changed as changed:
            return changed.digest
        digest = value.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            return _hash_open_file_from_start(fd)
        return digest
    finally:
        os.close(fd)


def _hash_open_file_from_start(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return _hash_open_file(fd)


class _Changed(Exception):
    """The file changed while it was hashed, or just before: its id is returned, not cached."""

    def __init__(self, digest: str) -> None:
        super().__init__(digest)
        self.digest = digest


def check_content(path: Path, expected: str) -> str:
    """The image's content id, which must be ``expected`` (its record's): an image changed after its
    record was written is refused, naming both ids."""
    from apppot.errors import ImageError

    try:
        found = content_id(path)
    except OSError as e:
        raise ImageError(f"cannot read the image {path}: {e.strerror}") from None
    if found != expected:
        raise ImageError(
            f"image {path} was changed after it was built: its record says content id {expected[:16]}, "
            f"its bytes are {found[:16]}; rebuild it (apppot image build --force) or ask its publisher"
        )
    return found

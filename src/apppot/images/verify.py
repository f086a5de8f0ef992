"""An image's content id (sha256 of its bytes), measured once per version of the file.

Hashing a 2 GiB appliance takes seconds; a job start must not. The id is cached in the user's host
cache under what changes when the file is written: its device, inode, size, and its mtime and ctime in
nanoseconds (ctime cannot be set, and any write or chmod moves it). File times move in clock ticks, not
nanoseconds, so a file changed within the last seconds is not cached: a second change in the same tick
would keep every part of the key (git's "racy" files).

The key is no secret: anyone can stat the file and write the entry it would have. So the cache guards
against accidental changes and against other users' changes, not against the cache's owner: an id is
taken from the cache only from an entry the effective uid wrote (root using another user's cache hashes
every time), and only when it is a well-formed digest.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import time
from pathlib import Path

from apppot import hostcache

CACHE_KIND = "content-id"
SETTLED_NS = 2_000_000_000  # a file whose ctime is this close to now is hashed, never cached
_DIGEST = re.compile("[0-9a-f]{64}")


def _identity(st: os.stat_result) -> list[str]:
    return [str(st.st_dev), str(st.st_ino), str(st.st_size), str(st.st_mtime_ns), str(st.st_ctime_ns)]


def _hash_open_file(fd: int) -> str:
    h = hashlib.sha256()
    while block := os.read(fd, 1 << 20):
        h.update(block)
    return h.hexdigest()


def content_id(path: Path) -> str:
    """sha256 of the file's bytes, from the cache when this very version of the file was hashed before.
    Raises OSError when the file cannot be read or is not a regular file (a FIFO would block the reader)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return content_id_of_open_file(fd)
    finally:
        os.close(fd)


def content_id_of_open_file(fd: int) -> str:
    """content_id of the file open as ``fd``: both the key and the hash come from that open file; a file
    changed while it was hashed, or changed in the last seconds, is not cached."""
    before = os.fstat(fd)
    key = _identity(before)

    def measure() -> dict[str, str]:
        digest = _hash_open_file_from_start(fd)
        if _identity(os.fstat(fd)) != key or time.time_ns() - before.st_ctime_ns < SETTLED_NS:
            raise _Changed(digest)
        return {"sha256": digest}

    try:
        value = hostcache.cached(CACHE_KIND, key, measure, own_only=True)
    except _Changed as changed:
        return changed.digest
    digest = value.get("sha256")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        return _hash_open_file_from_start(fd)
    return digest


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
    fd = open_image(path)
    try:
        return check_open_file(fd, path, expected)
    finally:
        os.close(fd)


def open_checked(path: Path, expected: str) -> int:
    """The image, opened read-only, whose bytes were checked against ``expected``: the caller boots this
    open file (bubblewrap binds it), so a file swapped in under the name after the check is not the one
    booted. The descriptor is the caller's to close."""
    fd = open_image(path)
    try:
        check_open_file(fd, path, expected)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_still_named(fd: int, path: Path) -> None:
    """Refuse when ``path`` no longer names the file checked as ``fd`` (moved, replaced or rewritten
    since): for a hypervisor that opens the image by its name."""
    from apppot.errors import ImageError

    try:
        now = _identity(os.stat(path))
    except OSError as e:
        raise ImageError(f"cannot read the image {path}: {e.strerror}") from None
    if now != _identity(os.fstat(fd)):
        raise ImageError(f"image {path} was replaced or changed after its content id was checked; start the job again")


def open_image(path: Path) -> int:
    """The image opened read-only as the file a job boots: a regular file (ImageError otherwise)."""
    from apppot.errors import ImageError

    try:
        # Non-blocking: a FIFO put where the image was must not hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise ImageError(f"cannot read the image {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"image {path} is not a regular file; give the image file itself")
    return fd


def check_open_file(fd: int, path: Path, expected: str) -> str:
    """The content id of the image open as ``fd`` (named ``path``), which must be ``expected``."""
    from apppot.errors import ImageError

    try:
        found = content_id_of_open_file(fd)
    except OSError as e:
        raise ImageError(f"cannot read the image {path}: {e.strerror}") from None
    if found != expected:
        raise ImageError(
            f"image {path} was changed after it was built: its record says content id {expected[:16]}, "
            f"its bytes are {found[:16]}; rebuild it (apppot image build --force) or ask its publisher"
        )
    return found

"""UML copy-on-write files: create them, and check them against their base image.

A COW file (UML's "ubd COW", version 3) starts with a big-endian header that
names its base (backing file) and records the base's mtime and size; then comes
a bitmap of changed sectors, then the changed sectors. UML itself only compares
mtime and size (whole seconds). AppPot also writes its own record of the base into
the header's padding, which UML neither reads nor writes: the base's device, inode,
size, and mtime and ctime in nanoseconds. A user can put an mtime back, but not a
ctime or an inode, so any change to the base after the COW was made is refused
with a clear message before the guest boots.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
from pathlib import Path
from typing import NamedTuple

from apppot import userpath
from apppot.errors import CowError

_COW_FIX = "give the COW file itself, or a new file name to --cow"

COW_MAGIC = 0x4F4F4F4D  # "OOOM"
COW_VERSION = 3
_HEADER = struct.Struct(">IIIQIII4096s")
SECTOR_SIZE = 512
ALIGNMENT = 4096

# Where a base whose own path UML cannot take (blanks, commas) appears in the sandbox.
BASE_DIR = "/apppot/base"
_UML_SAFE = re.compile(r"/[^\s,\"]*")
# AppPot's record of the base: in the padding between UML's header and its bitmap.
RECORD_OFFSET = _HEADER.size
RECORD_MAGIC = b"apppot-base-1\n"
_RECORD_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


def base_path_for(fs_uuid: str) -> str:
    """The path under which a base with this filesystem UUID is shown to UML."""
    return f"{BASE_DIR}/{fs_uuid}.img"


def uml_base_path(image: Path, fs_uuid: str) -> str:
    """The base's path as UML sees it. The same with and without the sandbox where it can be: UML writes
    it into the COW's header, and rewrites the header when it is given another path."""
    real = str(image.resolve())
    return real if _UML_SAFE.fullmatch(real) else base_path_for(fs_uuid)


class CowHeader(NamedTuple):
    backing_file: str
    mtime: int
    size: int
    sectorsize: int
    alignment: int

    @property
    def base_uuid(self) -> str | None:
        """The base's filesystem UUID if AppPot made this COW, else None."""
        prefix = BASE_DIR + "/"
        if self.backing_file.startswith(prefix) and self.backing_file.endswith(".img"):
            return self.backing_file[len(prefix) : -len(".img")]
        return None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def data_offset(size: int) -> int:
    """Where the sector data starts in a COW for a base of ``size`` bytes."""
    bitmap_offset = _round_up(_HEADER.size, ALIGNMENT)
    bitmap_len = _round_up(size // SECTOR_SIZE, 8) // 8
    return _round_up(bitmap_offset + bitmap_len, ALIGNMENT)


def render_header(backing_file: str, mtime: int, size: int) -> bytes:
    """The header bytes of a new, empty COW file."""
    path = backing_file.encode()
    if len(path) >= 4096:
        raise CowError(f"base image path too long for a COW header: {backing_file}")
    return _HEADER.pack(COW_MAGIC, COW_VERSION, mtime & 0xFFFFFFFF, size, SECTOR_SIZE, ALIGNMENT, 0, path)


def parse_header(data: bytes) -> CowHeader | None:
    """The header of a COW file, or None if ``data`` does not start with one."""
    if len(data) < _HEADER.size:
        return None
    magic, version, mtime, size, sectorsize, alignment, _fmt, path = _HEADER.unpack_from(data)
    if magic != COW_MAGIC or version != COW_VERSION:
        return None
    return CowHeader(path.split(b"\0", 1)[0].decode(errors="replace"), mtime, size, sectorsize, alignment)


def read_header(cow: Path) -> CowHeader:
    try:
        with userpath.open_for_reading(cow, "COW file", CowError, _COW_FIX) as f:
            data = f.read(_HEADER.size)
    except OSError as e:
        raise CowError(f"cannot read COW file {cow}: {e.strerror}; check the path and its permissions") from e
    header = parse_header(data)
    if header is None:
        raise CowError(f"{cow} is not a UML copy-on-write file; give a new file name to --cow, or the right COW file")
    return header


def render_record(st: os.stat_result, fs_uuid: str) -> bytes:
    """AppPot's record of a base: which filesystem it holds, and what must not change while a COW of it is in use."""
    record: dict[str, object] = {"uuid": fs_uuid, **{f: getattr(st, f) for f in _RECORD_FIELDS}}
    return RECORD_MAGIC + json.dumps(record).encode() + b"\n"


def read_record(cow: Path) -> dict[str, object] | None:
    """The record of the base in a COW AppPot made, or None for a COW made elsewhere or by an older AppPot."""
    with userpath.open_for_reading(cow, "COW file", CowError, _COW_FIX) as f:
        f.seek(RECORD_OFFSET)
        data = f.read(ALIGNMENT)
    if not data.startswith(RECORD_MAGIC):
        return None
    try:
        record = json.loads(data[len(RECORD_MAGIC) :].split(b"\n", 1)[0])
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def create(cow: Path, base: Path, fs_uuid: str) -> None:
    """Create an empty COW file for ``base``; never overwrites an existing file."""
    st = base.stat()
    header = render_header(uml_base_path(base, fs_uuid), int(st.st_mtime), st.st_size) + render_record(st, fs_uuid)
    try:
        fd = os.open(cow, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # what the job wrote is private
    except FileExistsError:
        raise CowError(f"COW file {cow} appeared while AppPot was creating it; try again") from None
    except OSError as e:
        raise CowError(f"cannot create COW file {cow}: {e.strerror}; choose a writable place for --cow") from e
    try:
        os.write(fd, header)
        os.ftruncate(fd, data_offset(st.st_size) + st.st_size)
    finally:
        os.close(fd)


def check_matches(cow: Path, base: Path, fs_uuid: str) -> None:
    """Refuse a COW that was made against another base, or against this base before it changed."""
    header = read_header(cow)
    st = base.stat()
    record = read_record(cow)
    if record is not None:
        if record.get("uuid") != fs_uuid:
            raise CowError(
                f"COW file {cow} belongs to another image (filesystem {record.get('uuid')}, not {fs_uuid}); "
                "use it with its own image, or give a new --cow file"
            )
        changed = [f[3:] for f in _RECORD_FIELDS if record.get(f) != getattr(st, f)]
        if changed:
            raise CowError(
                f"COW file {cow} was made against another copy of this image, or against {base} before it changed "
                f"({', '.join(changed)} differ): use it with the unchanged base image, or give a new --cow file"
            )
        return
    if header.base_uuid is not None and header.base_uuid != fs_uuid:
        raise CowError(
            f"COW file {cow} belongs to another image (filesystem {header.base_uuid}, not {fs_uuid}); "
            "use it with its own image, or give a new --cow file"
        )
    if header.size != st.st_size or header.mtime != int(st.st_mtime) & 0xFFFFFFFF:
        raise CowError(
            f"COW file {cow} was made against a different or modified base (size/mtime differ from {base}); "
            "use the unchanged base image, or give a new --cow file"
        )


def check_writable_without_privilege(cow: Path) -> None:
    """Refuse a COW only privilege could write: in the sandbox even root has no capability to override modes."""
    st = cow.stat()
    writable = (
        (st.st_uid == os.geteuid() and st.st_mode & 0o200)
        or (st.st_gid in (os.getegid(), *os.getgroups()) and st.st_mode & 0o020)
        or st.st_mode & 0o002
    )
    if not writable:
        raise CowError(
            f"COW file {cow} belongs to uid {st.st_uid} with mode {st.st_mode & 0o777:o}, so the job could not write it; "
            "change its owner or mode, or use another --cow"
        )


def check_unlocked(cow: Path) -> None:
    """Refuse a COW that a running job holds (UML locks the files it writes)."""
    try:
        with cow.open("r+b") as f:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(f, fcntl.LOCK_UN)
    except BlockingIOError:
        raise CowError(f"COW file {cow} is in use by another running job; wait for it, or use another --cow") from None
    except OSError as e:
        raise CowError(f"cannot open COW file {cow} for writing: {e.strerror}; check its permissions") from e

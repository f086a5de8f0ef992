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

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import struct
from collections.abc import Callable
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
    try:
        fd = os.open(cow, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # what the job wrote is private
    except FileExistsError:
        raise CowError(f"COW file {cow} appeared while AppPot was creating it; try again") from None
    except OSError as e:
        raise CowError(f"cannot create COW file {cow}: {e.strerror}; choose a writable place for --cow") from e
    try:
        fill(fd, base, fs_uuid)
    finally:
        os.close(fd)


def fill(fd: int, base: Path, fs_uuid: str) -> None:
    """Write an empty COW for ``base`` into the new, empty file open at ``fd``."""
    st = base.stat()
    os.write(fd, render_header(uml_base_path(base, fs_uuid), int(st.st_mtime), st.st_size) + render_record(st, fs_uuid))
    os.ftruncate(fd, data_offset(st.st_size) + st.st_size)


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


# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (32 bytes with padding).
_FLOCK_STRUCT = struct.Struct("@hhqqi4x")


def check_unlocked(cow: Path) -> None:
    """Refuse a COW that a running job holds (UML locks the files it writes).

    Only asked (F_GETLK), never taken: a lock taken here for a moment, by a job that is about to be
    refused, could make the running job's UML fail to lock its COW as it boots."""
    try:
        with cow.open("rb") as f:
            query = _FLOCK_STRUCT.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            held = _FLOCK_STRUCT.unpack(fcntl.fcntl(f, fcntl.F_GETLK, query))[0] != fcntl.F_UNLCK
    except OSError as e:
        raise CowError(f"cannot open COW file {cow}: {e.strerror}; check its permissions") from e
    if held:
        raise in_use(cow)


# Where flock(2) is carried out as a POSIX lock on the server, so it would collide with UML's own lock.
_FLOCK_IS_POSIX = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs"})
Fill = Callable[[int, Path], None]  # writes a new COW or overlay: its descriptor and its path


def in_use(cow: Path) -> CowError:
    return CowError(f"--cow {cow} is in use by another running job; wait for it, or use another --cow")


def hold(cow: Path, fill_new: Fill, fstype: str) -> int:
    """Open ``cow`` (made with ``fill_new`` where it does not exist) and lock it for this job; the lock lasts
    until the returned descriptor is closed, so of several jobs started on one COW exactly one runs.

    The lock is flock(2), which on local filesystems is independent of the POSIX lock UML takes and of
    QEMU's OFD locks (a POSIX lock here would keep UML out). A new COW is filled and locked under a
    private name, then linked into place: another job sees it only whole, and already locked."""
    fd = _open_existing(cow)
    if fd is None:
        fd = _create_held(cow, fill_new)
    if fd is None:  # another job linked it first
        fd = _open_existing(cow)
        if fd is None:
            raise CowError(f"COW file {cow} vanished while AppPot was opening it; try again")
    if fstype in _FLOCK_IS_POSIX:  # UML's and QEMU's own locks are all there is on such a filesystem
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise in_use(cow) from None
    return fd


def _open_existing(cow: Path) -> int | None:
    try:
        fd = os.open(cow, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CowError(f"--cow {cow} is a symbolic link; give the COW file itself, or a new file name") from None
        raise CowError(f"cannot open COW file {cow}: {e.strerror}; check its permissions") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CowError(f"--cow {cow} is not a regular file; give a new file name")
    return fd


def _create_held(cow: Path, fill_new: Fill) -> int | None:
    """A new COW at ``cow``, filled and locked before it appears there; None if another job's appeared first."""
    new = cow.with_name(f".{cow.name}.apppot-new-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)  # private
    except OSError as e:
        raise CowError(f"cannot create COW file {cow}: {e.strerror}; choose a writable place for --cow") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: no one else can hold it
        fill_new(fd, new)
        try:
            os.link(new, cow)
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as e:
            raise CowError(f"cannot create COW file {cow}: {e.strerror}; choose another place for --cow") from e
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    finally:
        new.unlink(missing_ok=True)

"""Reading changes archives. A job may have made them: every byte is hostile.

Each archive is read twice, as a stream: once to check the manifest and every header (and the
expanded size), then again handing each member, the same as checked, to the caller. Both readings
hash every byte of the file: the sha256 in the ArchiveInfo is of what was checked and handed on."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from . import sparse, xattrs
from .checks import ArchiveInfo, check_member, check_members, parse_manifest
from .paths import MANIFEST_MEMBER, SnapError

__all__ = ["ArchiveInfo", "check_archive", "max_size"]

MAX_SIZE_ENV = "APPPOT_CHANGES_MAX_SIZE"
DEFAULT_MAX_SIZE = 4 << 30  # bytes of the expanded (uncompressed) tar stream
MAX_MEMBERS = 1_000_000
MAX_HEADER = 1 << 20  # one pax or GNU long-name header, which tarfile reads whole into memory
MAX_MANIFEST = 64 << 20
# What the host holds of all members while it reads (their maps and xattrs, to compare the second reading).
MAX_SEGMENTS_IN_ALL = 1 << 20
MAX_XATTR_BYTES = 16 << 20
_CHUNK = 1 << 20


def max_size() -> int:
    """The largest expanded archive read: $APPPOT_CHANGES_MAX_SIZE (bytes, or a number with K, M, G, T), else 4 GiB."""
    text = os.environ.get(MAX_SIZE_ENV, "").strip()
    match = re.fullmatch(r"(\d+)([KMGT]?)", text, re.IGNORECASE)
    if not text:
        return DEFAULT_MAX_SIZE
    if match is None:
        raise SnapError(f"{MAX_SIZE_ENV}={text!r} is not a size; give bytes, or a number with K, M, G or T")
    return int(match[1]) << (10 * ("KMGT".index(match[2].upper()) + 1) if match[2] else 0)


class _Refused(Exception):
    """A member tarfile must not go on reading; a SnapError once the archive is named."""


class _Header(tarfile.TarInfo):
    """Headers as tarfile reads them, except what GNU tar would read differently (sparse files of the
    old formats: their map and GNU.sparse.name) and extended headers too large to hold in memory.
    PAX sparse 1.0 maps are read here, bounded and checked (apppot.snap.sparse.read_map)."""

    apppot_sparse: int | None = None  # a checked sparse member's data bytes

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
        if self.type in extended and self.size > MAX_HEADER:
            raise _Refused(f"has a header of more than {MAX_HEADER} bytes: refused")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused(f"member {self.name!r} is a sparse file of an old format (apppot-snap reads only PAX 1.0): refused")
        return super()._proc_member(archive)  # type: ignore[misc,no-any-return]

    def _proc_gnusparse_00(self, member: tarfile.TarInfo, pax: dict[str, str], *_: object) -> None:
        name = pax.get("GNU.sparse.name", pax.get("path", member.name))
        raise _Refused(f"member {name!r} is a sparse file of an old format (apppot-snap reads only PAX 1.0): refused")

    _proc_gnusparse_01 = _proc_gnusparse_00

    def _proc_gnusparse_10(self, member: tarfile.TarInfo, pax: dict[str, str], archive: tarfile.TarFile) -> None:
        what = f"member {pax.get('GNU.sparse.name', member.name)!r}"
        try:
            if "size" in pax or member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise SnapError(f"{what} is a sparse map on no plain file: refused")
            realsize = sparse.parse_number(pax.get("GNU.sparse.realsize", ""), what)
            segments, _ = sparse.read_map(lambda: archive.fileobj.read(tarfile.BLOCKSIZE), member.size, realsize, what)
        except SnapError as e:
            raise _Refused(str(e)) from None
        member.offset_data = archive.fileobj.tell()
        member.sparse = segments  # type: ignore[assignment]
        member.apppot_sparse = sum(length for _, length in segments)  # type: ignore[attr-defined]

    def _apply_pax_info(self, pax: dict[str, str], encoding: str, errors: str) -> None:
        if any(key.startswith("GNU.sparse.") for key in pax) and self.apppot_sparse is None:
            raise _Refused(f"member {self.name!r} has sparse records without a PAX 1.0 map: refused")
        super()._apply_pax_info(pax, encoding, errors)  # type: ignore[misc]
        if self.apppot_sparse is not None:  # the file's name, whatever path record came after
            self.name = pax.get("GNU.sparse.name", self.name).rstrip("/")


class _Hashed(io.RawIOBase):
    """The archive file, read through its descriptor, each byte hashed as it is read."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = os.readv(self.fd, [buffer])
        self.sha256.update(memoryview(buffer)[:n])
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


class _Expanded:
    """The archive's tar stream, gunzipped if it is gzipped, as tarfile reads it: never more than limit
    bytes. Read to its end, the gzip trailer (CRC and length) is checked, and every byte of the file hashed."""

    def __init__(self, source: str, raw: io.BufferedReader[_Hashed], limit: int, hashed: _Hashed) -> None:
        self.source, self.limit, self.count, self.hashed = source, limit, 0, hashed
        gzipped = raw.peek(2)[:2] == b"\x1f\x8b"
        self._stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw

    def read(self, size: int = -1, /) -> bytes:
        try:
            data = self._stream.read(_CHUNK if size < 0 else min(size, _CHUNK))
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            why = str(e) or type(e).__name__
            raise SnapError(
                f"{self.source} is damaged ({why}): copy it again, or make it again with apppot-snap changes"
            ) from None
        except OSError as e:
            raise SnapError(f"cannot read {self.source}: {e.strerror}") from None
        self.count += len(data)
        if self.count > self.limit:
            raise _too_large(self.source, self.limit)
        return data

    def drain(self) -> str:
        """Read to the end of the file; the sha256 of all of it."""
        while self.read(_CHUNK):
            pass
        return self.hashed.sha256.hexdigest()

    def write(self, b: bytes, /) -> int:
        raise io.UnsupportedOperation("write")

    def tell(self) -> int:
        return self.count

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("seek")

    def close(self) -> None:
        self._stream.close()


def _too_large(source: str, limit: int) -> SnapError:
    return SnapError(
        f"{source} expands to more than {limit} bytes ({_human(limit)}), the limit: "
        f"make a smaller archive, or raise {MAX_SIZE_ENV}"
    )


def _human(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"


@contextlib.contextmanager
def _reading(source: str, limit: int) -> Iterator[tuple[tarfile.TarFile, _Expanded]]:
    """The archive as a stream of members, read once and in order; problems reading it are SnapErrors
    (those of the caller's own writing are not caught)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block us
    except FileNotFoundError:
        raise SnapError(f"changes archive {source} does not exist; give the file apppot-snap changes made") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # what opening a socket gives
            raise SnapError(f"changes archive {source} is a socket, not a file; give the archive apppot-snap made") from None
        raise SnapError(f"changes archive {source} cannot be read ({e.strerror}); give a file you can read") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before open(): a directory would make it raise
        os.close(fd)
        raise SnapError(f"changes archive {source} is not a file; give the tar.gz apppot-snap changes made")
    hashed = _Hashed(fd)
    with io.BufferedReader(hashed) as raw:
        expanded = _Expanded(source, raw, limit, hashed)
        try:
            with tarfile.open(fileobj=expanded, mode="r|", tarinfo=_Header) as tar:
                yield tar, expanded
        except _Refused as e:
            raise SnapError(f"{source}: {e}") from None
        except (tarfile.TarError, UnicodeError) as e:
            raise _unreadable(source, e) from None


def _unreadable(source: str, e: BaseException) -> SnapError:
    why = (str(e).splitlines() or [type(e).__name__])[0].rstrip(":")
    return SnapError(f"{source} is not a readable tar.gz archive ({why}); give an archive made by apppot-snap changes")


def check_archive(source: str) -> tuple[ArchiveInfo, list[tarfile.TarInfo]]:
    """Read and check a changes archive without extracting anything; every problem is a SnapError
    naming the offending member."""
    return _scan(source, max_size())


def _scan(source: str, limit: int, room: tuple[int, str] | None = None) -> tuple[ArchiveInfo, list[tarfile.TarInfo]]:
    """The first reading: the manifest and the members' headers, checked; their expanded size within
    limit (and room: the free bytes of the directory the copy goes to); the gzip read to its end."""
    with _reading(source, limit) as (tar, expanded):
        members = _members(tar)
        first = next(members, None)
        if first is None or first.name != MANIFEST_MEMBER or not first.isreg():
            raise SnapError(f"{source} has no {MANIFEST_MEMBER} first: it was not made by apppot-snap changes")
        if first.size > MAX_MANIFEST:
            raise SnapError(f"{source}: {MANIFEST_MEMBER} is larger than {MAX_MANIFEST} bytes: refused")
        extracted = tar.extractfile(first)
        assert extracted is not None
        info = parse_manifest(source, extracted.read())
        checked: list[tarfile.TarInfo] = []
        total = tarfile.RECORDSIZE  # the end of the archive, padded
        segments = xattr_bytes = 0
        for m in members:
            if len(checked) >= MAX_MEMBERS:
                raise SnapError(f"{source} has more than {MAX_MEMBERS} members: refused")
            check_member(source, m)
            m.pax_headers = {k: v for k, v in m.pax_headers.items() if k.startswith(xattrs.PAX_PREFIX)}  # checked
            segments += len(sparse.of(m) or [])
            xattr_bytes += sum(len(name) + len(value) for name, value in xattrs.from_pax(m.pax_headers))
            if segments > MAX_SEGMENTS_IN_ALL or xattr_bytes > MAX_XATTR_BYTES:
                what = (
                    f"{MAX_SEGMENTS_IN_ALL} sparse segments"
                    if segments > MAX_SEGMENTS_IN_ALL
                    else f"{MAX_XATTR_BYTES} bytes of xattrs"
                )
                raise SnapError(f"{source}: member {m.name!r} makes more than {what} in all: refused")
            fresh = fresh_header(m)
            total += len(fresh.tobuf(tarfile.PAX_FORMAT)) + -(-fresh.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if total > limit or (m.sparse is not None and m.size > limit):  # nor a file larger than that, holes or not
                raise _too_large(source, limit)
            if room and total > room[0]:
                raise SnapError(
                    f"{source} expands to at least {total} bytes ({_human(total)}), more than the {room[0]} bytes free "
                    f"in {room[1]}: free space there, or set TMPDIR to a larger filesystem"
                )
            checked.append(m)
        sha256 = expanded.drain()
    check_members(source, info, checked)
    return info._replace(sha256=sha256), checked


_Handler = Callable[[tarfile.TarFile, tarfile.TarInfo], None]


def _replay(source: str, limit: int, checked: list[tarfile.TarInfo], each: _Handler, sha256: str | None) -> None:
    """The second reading: each member again, the same as it was checked (or the file changed meanwhile:
    refused), handed to each with the tar its data can be read from; the file's bytes must be those of
    the first reading (sha256), or what was handed on is refused after all."""
    with _reading(source, limit) as (tar, expanded):
        members = _members(tar)
        next(members, None)  # the manifest
        for old in [*checked, None]:
            m = next(members, None)
            if (m and _fields(m)) != (old and _fields(old)):
                raise SnapError(f"{source} changed while it was read: refused; give it again")
            if m is not None:
                each(tar, m)
        if expanded.drain() != sha256:
            raise SnapError(f"{source} changed while it was read: refused; give it again")


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members in order, none of them kept by tarfile (which would hold every header and pax record)."""
    while (m := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]  # typeshed omits it
        yield m


def _fields(m: tarfile.TarInfo) -> tuple[object, ...]:
    return m.name, m.type, m.mode, m.uid, m.gid, m.size, m.mtime, m.linkname, m.sparse, xattrs.from_pax(m.pax_headers)


def fresh_header(m: tarfile.TarInfo) -> tarfile.TarInfo:
    """A new header with only the checked fields: no pax record of the original but its carried xattrs
    (checked) and, for a sparse file, its checked map's records; no owner name."""
    fresh = tarfile.TarInfo(m.name)
    fresh.type = tarfile.REGTYPE if m.isreg() else m.type
    fresh.mode = m.mode & 0o7777
    fresh.uid, fresh.gid, fresh.mtime = m.uid, m.gid, int(m.mtime)
    fresh.size = m.size if m.isreg() else 0
    fresh.linkname = m.linkname if m.issym() else ""
    fresh.pax_headers = {key: value for key, value in m.pax_headers.items() if key.startswith(xattrs.PAX_PREFIX)}
    segments = sparse.of(m)
    if segments is not None:
        fresh.pax_headers = {**sparse.pax_records(m.name, m.size), **fresh.pax_headers}
        fresh.size = len(sparse.encode_map(segments)) + sum(length for _, length in segments)
    return fresh


def sparse_data(tar: tarfile.TarFile, m: tarfile.TarInfo) -> sparse.SparseSource:
    """A checked sparse member's map and data as they are to be written again (read once, in order)."""
    stream = tar.fileobj
    assert stream is not None
    stream.seek(m.offset_data)
    return sparse.SparseSource(sparse.of(m) or [], lambda _offset, n: stream.read(min(n, 1 << 20)))

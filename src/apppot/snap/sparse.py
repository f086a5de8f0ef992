"""Sparse files as PAX sparse format 1.0 members (what GNU tar writes with --sparse and reads always).

The member's data is the map, decimal numbers one a line (the count of segments, then each one's
offset and length), padded to a block, followed by the segments' data back to back. Its pax
records name the file (GNU.sparse.name) and its apparent size (GNU.sparse.realsize)."""

from __future__ import annotations

import errno
import os
import tarfile

from .paths import SnapError

Segments = list[tuple[int, int]]  # (offset, length) of each run of data, ascending
MAX_SEGMENTS = 1 << 16
MAX_MAP = 1 << 20  # bytes of a map
_DIGITS = 20  # a 64-bit number


def data_segments(fd: int, size: int, blocks: int) -> Segments | None:
    """Where a file's data lies, or None if it has no holes worth keeping (or the filesystem cannot say)."""
    if size == 0 or blocks * 512 >= size:
        return None
    segments: Segments = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from here to the end
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            segments.append((start, end - start))
            pos = end
            if len(segments) > MAX_SEGMENTS:
                return None  # fragmented beyond what a map holds: stored whole
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    if not segments or segments[-1][0] + segments[-1][1] < size:
        segments.append((size, 0))  # the end of the file: GNU tar sizes the file by its last segment
    return segments


def of(m: tarfile.TarInfo) -> Segments | None:
    """A member's map as tarfile holds it (typeshed calls it bytes)."""
    return m.sparse  # type: ignore[return-value]


def encode_map(segments: Segments) -> bytes:
    text = "".join(f"{n}\n" for pair in segments for n in pair)
    raw = f"{len(segments)}\n{text}".encode()
    return raw + b"\0" * (-len(raw) % tarfile.BLOCKSIZE)


def pax_records(name: str, realsize: int) -> dict[str, str]:
    return {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name, "GNU.sparse.realsize": str(realsize)}


def parse_number(text: bytes | str, what: str) -> int:
    digits = text.encode() if isinstance(text, str) else text
    if not digits.isdigit() or not digits.isascii() or len(digits) > _DIGITS:
        raise SnapError(f"{what} has a malformed sparse map ({digits[:24]!r} is not a number): refused")
    return int(digits)


def read_map(read_block: object, stored: int, realsize: int, what: str) -> tuple[Segments, int]:
    """The segments of a member's map, read block by block (read_block: () -> bytes), checked: ascending,
    not overlapping, inside realsize, and with the map's blocks and the data filling the member
    exactly. Returns them and the blocks the map took."""
    assert callable(read_block)
    buf, blocks, wanted = b"", 0, None
    numbers: list[int] = []
    while wanted is None or len(numbers) < wanted:
        if b"\n" not in buf:
            if (blocks + 1) * tarfile.BLOCKSIZE > MAX_MAP:
                raise SnapError(f"{what} has a sparse map of more than {MAX_MAP} bytes: refused")
            block = read_block()
            if len(block) != tarfile.BLOCKSIZE:
                raise SnapError(f"{what} ends inside its sparse map: refused")
            buf += block
            blocks += 1
            continue
        line, buf = buf.split(b"\n", 1)
        number = parse_number(line, what)
        if wanted is None:
            if number > MAX_SEGMENTS:
                raise SnapError(f"{what} has more than {MAX_SEGMENTS} sparse segments: refused")
            wanted = 2 * number
        else:
            numbers.append(number)
    segments = list(zip(numbers[::2], numbers[1::2], strict=True))
    end = 0
    for offset, length in segments:
        if offset < end or offset + length > realsize:
            raise SnapError(f"{what} has a sparse map with overlapping or out-of-file segments: refused")
        end = offset + length
    if blocks * tarfile.BLOCKSIZE + sum(length for _, length in segments) != stored:
        raise SnapError(f"{what} has a sparse map that does not match its data: refused")
    return segments, blocks


class SparseSource:
    """A sparse member's data for tarfile.addfile: the map, then each segment read by read_at(offset, n)."""

    def __init__(self, segments: Segments, read_at: object) -> None:
        assert callable(read_at)
        self._map, self._segments, self._read_at = encode_map(segments), list(segments), read_at
        self.size = len(self._map) + sum(length for _, length in segments)

    def read(self, size: int = -1) -> bytes:
        """Up to size bytes, as many as there are (tarfile takes a short read for the end of the data)."""
        parts, wanted = [], self.size if size < 0 else size
        while wanted > 0:
            part = self._read_some(wanted)
            if not part:
                break
            parts.append(part)
            wanted -= len(part)
        return b"".join(parts)

    def _read_some(self, size: int) -> bytes:
        if self._map:
            out, self._map = self._map[:size], self._map[size:]
            return out
        while self._segments and self._segments[0][1] == 0:
            self._segments.pop(0)
        if not self._segments:
            return b""
        offset, length = self._segments[0]
        data: bytes = self._read_at(offset, min(size, length))
        if not data:
            return b""  # shrunk meanwhile: tarfile says so
        self._segments[0] = (offset + len(data), length - len(data))
        return data

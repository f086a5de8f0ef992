"""The job's standard input: the host's stdin, passed to the guest as chunk files, consumed no
further than the job reads.

The guest agent writes each chunk into a pipe that is the job's stdin and reports how many
chunks it has written in full (STDIN_READ). A pipe holds at most GUEST_PIPE bytes, so the job has
read at least everything written but the last GUEST_PIPE bytes. When the job ends, the agent lets
its feeder finish the chunk it is writing, drains what the job left in the pipe and reports that
count (STDIN_LEFT): the job read exactly the bytes written minus those left. The host then
consumes exactly that much of its own stdin:

- a pipe is only peeked at (tee(2) copies without consuming) and consumed as far as the guest
  shows the job has read; at the end exactly as far as the job read;
- a regular file is read ahead with pread (its offset untouched) and at the end positioned where
  the job stopped reading;
- anything else (a terminal, a socket, a device) is read as it comes, as before: AppPot may have
  consumed up to SPOOL_WINDOW chunks more than the job read.

Every count the guest reports is checked against what was sent: more is GuestMisbehaved.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import Enum

from apppot.channel import Channel, ChannelClosed
from apppot.errors import AppPotError, GuestMisbehaved, HostError
from apppot.protocol import STDIN_CHUNK, STDIN_END, STDIN_FILE, STDIN_LEFT, STDIN_POS, STDIN_READ, StdinMode, parse_count

FILE_LIMIT = 64 << 20  # a regular file up to this size is copied whole, so the job can seek in it
SPOOL_WINDOW = 4  # chunks the host may have sent ahead of the guest (files and other streams)
SPOOL_CHUNK = 1 << 20
GUEST_PIPE = 1 << 16  # what the job's stdin pipe in the guest holds at most (16 pages)
HOST_PIPE = 1 << 20  # what the host's stdin pipe is grown to, so AppPot can peek past GUEST_PIPE
IDLE_WAIT_S = (0.001, 0.005, 0.02)  # polling back-off while neither stdin nor the guest moves
JOIN_S = 2.0
SPLICE_F_NONBLOCK = 2  # tee(2): fail with EAGAIN instead of waiting for data


class Source(Enum):
    """What the host's stdin is, and so how exactly AppPot can leave what the job did not read."""

    PIPE = "pipe"  # peeked, consumed exactly
    FILE = "file"  # read ahead, then positioned exactly
    STREAM = "stream"  # read as it comes (terminals, sockets, devices)


def source_of(fd: int) -> Source:
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) and _libc_tee() is not None:
        return Source.PIPE
    if stat.S_ISREG(mode):
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_CUR)
            return Source.FILE
    return Source.STREAM


def _libc_tee() -> Callable[[int, int, int, int], int] | None:
    import ctypes  # only for a pipe as stdin: loading it costs milliseconds

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        tee = libc.tee
    except (OSError, AttributeError):
        return None
    tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
    tee.restype = ctypes.c_ssize_t
    result: Callable[[int, int, int, int], int] = tee
    return result


def _read_error(e: OSError) -> HostError:
    return HostError(f"cannot read stdin: {e.strerror}; the job was stopped, its input would have been incomplete")


class ChunkLedger:
    """The chunks sent so far: where each ends in the stream, and what the guest said of them."""

    def __init__(self) -> None:
        self.ends: list[int] = []  # the stream offset after each chunk not yet known fed, from index `first`
        self.first = 0  # chunks before this one the guest has written in full into the job's pipe
        self.fed_bytes = 0  # their bytes
        self.sent_bytes = 0

    @property
    def written(self) -> int:
        return self.first + len(self.ends)

    def add(self, size: int) -> int:
        """Record a chunk of ``size`` bytes; returns its index."""
        self.sent_bytes += size
        self.ends.append(self.sent_bytes)
        return self.written - 1

    def fed(self, count: int) -> list[int]:
        """The guest has written ``count`` chunks in full; returns the indexes newly known fed."""
        if count <= self.first:
            return []
        done = list(range(self.first, count))
        self.fed_bytes = self.ends[count - self.first - 1]
        del self.ends[: count - self.first]
        self.first = count
        return done

    def parse_fed(self, data: bytes) -> int:
        count = parse_count(data, self.written)
        if count is None:
            raise GuestMisbehaved(f"the guest reported {data[:20]!r} as {STDIN_READ}, not a count of stdin chunks")
        return count

    def parse_left(self, data: bytes) -> int:
        """Bytes of the fed chunks the job left unread, as the guest reported them."""
        left = parse_count(data, self.fed_bytes)
        if left is None:
            raise GuestMisbehaved(
                f"the guest reported {data[:20]!r} as {STDIN_LEFT}, not a count of at most {self.fed_bytes} stdin bytes"
            )
        return left


def file_rest(fd: int) -> int | None:
    """Bytes from the offset of a regular file ``fd`` to its end, or None if it is no regular file."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(st.st_size - os.lseek(fd, 0, os.SEEK_CUR), 0)
    except OSError:
        return None


def stdin_mode(fd: int = 0) -> StdinMode:
    """How a stdin that is neither /dev/null nor a terminal session reaches the job: a regular file of
    up to FILE_LIMIT bytes as a file (seekable, as on the host), anything else through a pipe."""
    rest = file_rest(fd)
    return StdinMode.FILE if rest is not None and rest <= FILE_LIMIT else StdinMode.SPOOL


class StdinFeed(threading.Thread, ABC):
    """Passes the host's stdin (fd 0) to the guest; ``settle`` leaves the rest for whoever reads next."""

    def __init__(self, channel: Channel, on_error: Callable[[], None], fd: int = 0) -> None:
        super().__init__(name="apppot-stdin", daemon=True)
        self.channel = channel
        self.on_error = on_error
        self.fd = fd
        self.stop = threading.Event()
        self.error: AppPotError | None = None

    def run(self) -> None:
        try:
            self._feed()
        except ChannelClosed:
            pass  # the job is over
        except AppPotError as e:
            self.error = e
            self.on_error()
        except OSError as e:
            self.error = HostError(f"cannot pass stdin to the guest: {e.strerror}; check the space in TMPDIR")
            self.on_error()

    @abstractmethod
    def _feed(self) -> None:
        """Pass stdin to the guest until it ends or ``stop`` is set."""

    @abstractmethod
    def settle(self) -> None:
        """After the guest ended: leave the host's stdin just past what the job read."""


def open_stdin(mode: StdinMode, channel: Channel, on_error: Callable[[], None]) -> StdinFeed | None:
    """The thread that passes the host's stdin, for the modes that read it (started by the caller)."""
    if mode is StdinMode.FILE:
        return StdinFile(channel, on_error)
    if mode is StdinMode.SPOOL:
        return StdinSpool(channel, on_error)
    return None


class StdinFile(StdinFeed):
    """The rest of a regular file, copied whole as the job's stdin.file; at the end the host's offset
    is where the job's is."""

    def __init__(self, channel: Channel, on_error: Callable[[], None], fd: int = 0) -> None:
        super().__init__(channel, on_error, fd)
        self.start_offset = os.lseek(fd, 0, os.SEEK_CUR)
        self.size = file_rest(fd) or 0

    def _feed(self) -> None:
        try:
            self.channel.send_copy(STDIN_FILE, self.fd, self.start_offset, self.size)
        except OSError as e:
            raise HostError(f"cannot pass stdin to the guest: {e.strerror}; check stdin and the space in TMPDIR") from None
        # The copy is shorter if the file shrank meanwhile: the guest gets the size it holds.
        self.size = min(self.size, os.fstat(self.fd).st_size - self.start_offset)
        self.channel.send(STDIN_END, f"{max(self.size, 0)}\n".encode())

    def settle(self) -> None:
        """Without the guest's report (the job was stopped, or the guest died) the offset stays."""
        self.stop.set()
        self.join(JOIN_S)
        if self.is_alive():
            return
        data = self.channel.read_report(STDIN_POS)
        if data is None:
            return
        pos = parse_count(data, self.size)
        if pos is None:
            raise GuestMisbehaved(f"the guest reported {data[:20]!r} as {STDIN_POS}, not an offset of at most {self.size}")
        _seek(self.fd, self.start_offset + pos)


def _seek(fd: int, offset: int) -> None:
    try:
        os.lseek(fd, offset, os.SEEK_SET)
    except OSError as e:
        raise HostError(f"cannot move stdin to where the job stopped reading: {e.strerror}") from None


class StdinSpool(StdinFeed):
    """Passes the host's stdin through the guest's pipe (see the module's docstring)."""

    def __init__(self, channel: Channel, on_error: Callable[[], None], fd: int = 0) -> None:
        super().__init__(channel, on_error, fd)
        self.source = source_of(fd)
        self.ledger = ChunkLedger()
        self.consumed = 0  # bytes of a pipe read and dropped (PIPE)
        self.start_offset = os.lseek(fd, 0, os.SEEK_CUR) if self.source is Source.FILE else 0
        self._peek: tuple[int, int] | None = None
        self._peek_chunk = SPOOL_CHUNK  # a pipe: a few chunks fit in what can be peeked at, so the guest never waits
        self._lag = GUEST_PIPE  # a pipe is consumed up to this much behind what the guest fed
        self._idle = 0

    def _feed(self) -> None:
        try:
            if self.source is Source.PIPE:
                self._open_peek()
            self._spool()
        finally:
            if self._peek is not None:
                for pipe_fd in self._peek:
                    os.close(pipe_fd)

    def _open_peek(self) -> None:
        with contextlib.suppress(OSError):  # a pipe that cannot grow is peeked at as it is
            fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, HOST_PIPE)
        size = fcntl.fcntl(self.fd, fcntl.F_GETPIPE_SZ)
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._peek = (read_end, write_end)
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, size)
        visible = min(size, fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ))  # tee sees no further
        if visible < 2 * GUEST_PIPE:
            # Lagging would leave nothing new to peek at once the guest fed all: consume what it fed,
            # up to GUEST_PIPE bytes more than the job read.
            self._lag = 0
        self._peek_chunk = max((visible - self._lag) // 4, 4096)

    def _spool(self) -> None:
        while not self.stop.is_set():
            self._take_report()
            data = self._next_chunk()
            if data is None:  # nothing new yet
                self.stop.wait(IDLE_WAIT_S[min(self._idle, len(IDLE_WAIT_S) - 1)])
                self._idle += 1
                continue
            if not data:
                break
            self._idle = 0
            self.channel.send(STDIN_CHUNK.format(self.ledger.add(len(data))), data)
        else:
            return
        self.channel.send(STDIN_END, f"{self.ledger.written}\n".encode())

    def _take_report(self) -> None:
        """Remove what the guest has fed to the job; consume a pipe as far as the job must have read."""
        data = self.channel.read_report(STDIN_READ)
        if data is None or not data.strip():  # not yet, or the agent is rewriting it
            return
        if self.channel.has_report(STDIN_LEFT):  # the job has ended: the agent drained its pipe, settle counts
            return
        for index in self.ledger.fed(self.ledger.parse_fed(data)):
            self.channel.discard(STDIN_CHUNK.format(index))
        if self.source is Source.PIPE:
            self._consume_to(self.ledger.fed_bytes - self._lag)

    def _next_chunk(self) -> bytes | None:
        """The next chunk; b"" at the end of stdin, None if there is nothing new yet."""
        if self.source is Source.PIPE:
            return self._peek_pipe()
        if self.ledger.written - self.ledger.first >= SPOOL_WINDOW:
            return None
        if self.source is Source.FILE:
            try:
                return os.pread(self.fd, SPOOL_CHUNK, self.start_offset + self.ledger.sent_bytes)
            except OSError as e:
                raise _read_error(e) from None
        return self._read_stream()

    def _read_stream(self) -> bytes | None:
        try:
            return os.read(self.fd, SPOOL_CHUNK)
        except BlockingIOError:  # a non-blocking stdin: wait for data, not end there
            select.select([self.fd], [], [], IDLE_WAIT_S[-1])
            return None
        except OSError as e:
            raise _read_error(e) from None

    def _peek_pipe(self) -> bytes | None:
        """What the pipe holds past what was sent, copied out without consuming it."""
        assert self._peek is not None
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        hung_up = any(ev & select.POLLHUP for _, ev in poller.poll(0))  # before the count: then it is final
        held = _pipe_bytes(self.fd)
        unsent = self.ledger.sent_bytes - self.consumed
        if held <= unsent:
            return b"" if hung_up and held == unsent else None
        read_end, write_end = self._peek
        tee = _libc_tee()
        assert tee is not None
        copied = tee(self.fd, write_end, min(held, unsent + self._peek_chunk), SPLICE_F_NONBLOCK)
        if copied < 0:
            import ctypes

            code = ctypes.get_errno()
            if code == errno.EAGAIN:
                return None
            raise _read_error(OSError(code, os.strerror(code)))
        data = bytearray()
        while len(data) < copied:
            data += os.read(read_end, copied - len(data))
        return bytes(data[unsent:]) or None

    def _consume_to(self, target: int) -> None:
        """Read and drop the pipe's bytes up to stream offset ``target`` (never past what was sent)."""
        target = min(target, self.ledger.sent_bytes)
        while self.consumed < target:
            try:
                n = len(os.read(self.fd, min(target - self.consumed, SPOOL_CHUNK)))
            except BlockingIOError:
                select.select([self.fd], [], [], IDLE_WAIT_S[-1])
                continue
            except OSError as e:
                raise _read_error(e) from None
            if n == 0:
                raise HostError("stdin ended before the bytes AppPot had passed to the job; was it read by another process?")
            self.consumed += n

    def settle(self) -> None:
        """After the guest ended: leave the host's stdin just past what the job read.

        Without the guest's final report (the job was stopped, or the guest died) only what the
        job surely read is consumed."""
        self.stop.set()
        if self.source is Source.STREAM:
            return  # the thread may be blocked in a read; what it read is gone in any case
        self.join(JOIN_S)
        if self.is_alive():
            return
        read = self.channel.read_report(STDIN_READ)
        left = self.channel.read_report(STDIN_LEFT)
        if read is not None and read.strip():
            self.ledger.fed(self.ledger.parse_fed(read))
        job_read = self.ledger.fed_bytes - GUEST_PIPE  # what the job surely read
        if left is not None:
            job_read = self.ledger.fed_bytes - self.ledger.parse_left(left)
        job_read = max(job_read, 0)
        if self.source is Source.PIPE:
            self._consume_to(job_read)
        else:
            _seek(self.fd, self.start_offset + job_read)


def _pipe_bytes(fd: int) -> int:
    import termios

    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, "little")

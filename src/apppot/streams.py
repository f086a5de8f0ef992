"""The job's standard streams: how the host's map into the guest, and the threads that carry them."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from apppot.channel import Channel, ChannelClosed
from apppot.errors import AppPotError, GuestMisbehaved, HostError
from apppot.hostfds import stdout_is_stderr
from apppot.protocol import STDIN_CHUNK, STDIN_END, STDIN_READ, StdinMode, StreamMode, parse_count

SPOOL_WINDOW = 4  # stdin chunks the host may have written ahead of the guest
SPOOL_CHUNK = 1 << 20


class Streams(NamedTuple):
    """How the host's standard streams map into the guest."""

    stdin: StdinMode
    stdout: StreamMode
    stderr: StreamMode
    interactive: bool


def _is_null_device(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return True  # a closed stream reads as empty
    try:
        null = os.stat("/dev/null")
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev


def detect_streams() -> Streams:
    interactive = os.isatty(0) and os.isatty(1)

    def mode(fd: int) -> StreamMode:
        return StreamMode.TTY if os.isatty(fd) else StreamMode.PIPE

    if interactive:
        stdin = StdinMode.TTY
    elif _is_null_device(0):
        stdin = StdinMode.NULL
    else:
        stdin = StdinMode.SPOOL
    stderr = StreamMode.STDOUT if stdout_is_stderr() else mode(2)
    return Streams(stdin, mode(1), stderr, interactive)


class StdinSpool(threading.Thread):
    """Copies the host's stdin into numbered chunk files in the control directory.

    The guest cannot remove them (the directory is read-only to it): it reports how many it
    consumed, and the host removes those and keeps at most SPOOL_WINDOW chunks ahead."""

    def __init__(self, channel: Channel, on_error: Callable[[], None]) -> None:
        super().__init__(name="apppot-stdin", daemon=True)
        self.channel = channel
        self.on_error = on_error
        self.stop = threading.Event()
        self.error: AppPotError | None = None

    def run(self) -> None:
        try:
            self._spool()
        except ChannelClosed:
            pass  # the job is over
        except AppPotError as e:
            self.error = e
            self.on_error()
        except OSError as e:
            self.error = HostError(f"cannot pass stdin to the guest: {e.strerror}; check the space in TMPDIR")
            self.on_error()

    def _spool(self) -> None:
        written = consumed = 0
        while not self.stop.is_set():
            while written - consumed >= SPOOL_WINDOW:
                consumed = self._consumed(consumed, written)
                if written - consumed < SPOOL_WINDOW:
                    break
                if self.stop.wait(0.005):
                    return
            try:
                data = os.read(0, SPOOL_CHUNK)
            except OSError:
                data = b""
            if not data:
                break
            self.channel.send(STDIN_CHUNK.format(written), data)
            written += 1
        self.channel.send(STDIN_END, f"{written}\n".encode())

    def _consumed(self, consumed: int, written: int) -> int:
        """How many chunks the guest has consumed; those are removed."""
        data = self.channel.read_report(STDIN_READ)
        if data is None or not data.strip():  # not yet, or the agent is rewriting it
            return consumed
        count = parse_count(data, written)
        if count is None:
            raise GuestMisbehaved(f"the guest reported {data[:20]!r} as {STDIN_READ}, not a count of stdin chunks")
        for index in range(consumed, count):
            self.channel.discard(STDIN_CHUNK.format(index))
        return max(consumed, count)


def terminal_size() -> tuple[int | None, int | None]:
    for fd in (1, 0, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    return None, None


def save_termios(fd: int) -> tuple[int, list[Any]] | None:
    import termios  # only interactive jobs need it; loading it costs a millisecond

    try:
        return fd, termios.tcgetattr(fd)
    except termios.error:
        return None


def restore_termios(saved: tuple[int, list[Any]]) -> None:
    import termios

    fd, attrs = saved
    with contextlib.suppress(termios.error, OSError):
        termios.tcsetattr(fd, termios.TCSADRAIN, attrs)

"""The job's output, from the guest's channels to the host's stdout and stderr: every byte, or a reason.

One thread per channel copies the guest's pipe to the host's stream until the pipe's end: it waits
out a slow reader or a non-blocking stream (EAGAIN) however long they take. When the host's stream
fails (a full disk, /dev/full, an I/O error, a stream closed when AppPot started), the thread keeps
reading and drops what it reads, so the guest never blocks, and the failure becomes AppPot's exit
status (OutputLost, 125) with the job's own status in its message. A reader that went away (EPIPE)
ends the job as SIGPIPE would end a native one.

Shutdown is explicit: once the hypervisor's process group is gone, no process holds a write end of
the pipes (the runner creates them close-on-exec and passes them to the hypervisor alone), so each
relay reaches the end of its pipe, and `drain` waits for that without a timeout. Should a leftover
process hold a pipe open all the same, a relay that has waited HELD_OPEN_S for data after the stop
is given up and reported, never silently.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

from apppot.errors import OutputLost
from apppot.hostfds import closed_at_start

CHUNK = 1 << 16
HELD_OPEN_S = 10.0  # after the hypervisor ended, waiting for data no live process can write
JOIN_POLL_S = 0.1  # how often drain looks at a signal or a held pipe while a relay still works


class Relay(threading.Thread):
    """Copies one of the guest's output channels (``src``, which it closes at the end) to the host's
    ``dst``; ``dst`` None stands for a stream that was closed when AppPot started."""

    def __init__(self, src: int, dst: int | None, stream: str, on_broken: Callable[[], None]) -> None:
        super().__init__(name=f"apppot-relay-{stream}", daemon=True)
        self.src = src
        self.dst = dst
        self.stream = stream  # as messages name it: "stdout"
        self.on_broken = on_broken
        self.broken = False  # the reader went away (EPIPE)
        self.error: OSError | None = None  # the host's stream failed otherwise
        self.held_open = False  # drain gave up waiting for the pipe's end
        self.waiting_since: float | None = None  # when it began to wait for the guest's data

    def run(self) -> None:
        try:
            self._copy()
        finally:
            os.close(self.src)

    def _copy(self) -> None:
        while True:
            self.waiting_since = time.monotonic()
            try:
                data = os.read(self.src, CHUNK)
            except OSError:
                return  # cannot happen on a pipe of our own; nothing more can come
            self.waiting_since = None
            if not data:
                return
            if self.broken or self.error is not None:
                continue  # keep draining, so the guest never blocks on a full pipe
            try:
                self._write_all(data)
            except BrokenPipeError:
                self.broken = True
                self.on_broken()
            except OSError as e:
                self.error = e

    def _write_all(self, data: bytes) -> None:
        if self.dst is None:
            raise OSError(errno.EBADF, f"{os.strerror(errno.EBADF)}, closed when apppot started")
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.dst, view)
            except BlockingIOError:  # a non-blocking stream: wait until it takes more
                _wait_writable(self.dst)
                continue
            view = view[written:]


def _wait_writable(fd: int) -> None:
    """Until fd takes data, or has an error the next write reports."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll()


def start_relays(out_r: int, err_r: int, joined: bool, on_broken: Callable[[], None]) -> list[Relay]:
    """Relays from the guest's stdout and stderr channels to the host's 1 and 2, started. With ``joined``
    the job's stderr comes on its stdout channel (fd 1 and 2 are one open file on the host)."""
    closed = closed_at_start()
    relays = [
        Relay(out_r, None if 1 in closed else 1, "stdout and stderr" if joined else "stdout", on_broken),
        Relay(err_r, None if 2 in closed else 2, "stderr", on_broken),
    ]
    for relay in relays:
        relay.start()
    return relays


def drain(relays: Sequence[Relay], abandon: Callable[[], bool]) -> None:
    """Wait, once the hypervisor has ended, until every relay has delivered all the guest wrote.

    No timeout while a relay writes (a slow reader is waited for); ``abandon`` (a signal to AppPot)
    stops the wait, and a relay still waiting for data HELD_OPEN_S after the stop is marked held_open."""
    stopped = time.monotonic()
    for relay in relays:
        while relay.is_alive():
            relay.join(JOIN_POLL_S)
            if abandon():
                return
            waiting = relay.waiting_since
            if relay.is_alive() and waiting is not None and time.monotonic() - max(waiting, stopped) > HELD_OPEN_S:
                relay.held_open = True
                break


def lost_output(relays: Sequence[Relay], status: int) -> OutputLost | None:
    """The error for output the host's streams did not take in full, naming the job's own ``status``."""
    problems = []
    for relay in relays:
        if relay.error is not None:
            problems.append(f"the job's {relay.stream}: {relay.error.strerror}")
        elif relay.held_open:
            problems.append(f"all of the job's {relay.stream}: a process left over held it open after the guest ended")
    if not problems:
        return None
    return OutputLost(f"cannot write {', nor '.join(problems)} (the job itself exited with {status})")


__all__ = ["HELD_OPEN_S", "Relay", "drain", "lost_output", "start_relays"]

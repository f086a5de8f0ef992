"""The host's descriptors 0-2 as AppPot found them: which were closed, and whether stdout and stderr are one file.

A closed 0, 1 or 2 gets /dev/null at once, so that no descriptor AppPot opens later (a pipe to
the guest, a log) can take its number and receive what was meant for the stream. The job still
sees the stream as closed: what it writes there is refused as a native write would be (EBADF).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import sys

_closed: frozenset[int] = frozenset()

# kcmp(2)'s number where it is not the generic one; KCMP_FILE compares two open file descriptions.
_KCMP_SYSCALL = {"x86_64": 312, "i386": 349, "i686": 349, "ppc64le": 354, "ppc64": 354, "s390x": 343}
_KCMP_GENERIC = 272  # aarch64, riscv64 and the other architectures with the generic table
KCMP_FILE = 0


class ClosedStream(io.TextIOBase):
    """sys.stdout for a stdout that was closed: writing fails as it would natively, with EBADF."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name
        self._failed = False  # a write failed: flush fails too (argparse's help hides write errors)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._failed = True
        raise self._error()

    def flush(self) -> None:
        if self._failed:
            raise self._error()

    def _error(self) -> OSError:
        return OSError(errno.EBADF, f"{os.strerror(errno.EBADF)}, closed when apppot started", self._name)

    @property
    def buffer(self) -> ClosedStream:  # sys.stdout.buffer.write fails the same way
        return self


def fill_closed() -> frozenset[int]:
    """Put /dev/null on each of 0, 1 and 2 that is closed; returns (and remembers) which were.

    Call first thing at an entry point, before anything opens a descriptor."""
    global _closed
    closed = frozenset(fd for fd in (0, 1, 2) if not _is_open(fd))
    for fd in sorted(closed):
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:  # the lowest free number is fd, unless something took a lower one first
            os.dup2(null, fd)
            os.close(null)
        os.set_inheritable(fd, True)  # the hypervisor's helpers inherit 0-2 like any child
    if 1 in closed:
        sys.stdout = ClosedStream("stdout")
    if 2 in closed:  # AppPot's own messages then go nowhere, as they would have
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    if 0 in closed:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
    _closed = closed
    return closed


def closed_at_start() -> frozenset[int]:
    """The descriptors among 0-2 that fill_closed found closed (none if it was not called)."""
    return _closed


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def same_open_file(fd1: int, fd2: int) -> bool:
    """Whether writes to fd1 and fd2 land in one stream, in the order they are made (`>log 2>&1`).

    A pipe, terminal or socket is one stream whatever opened it. A regular file is one only as one
    open file description (one offset): `>log 2>log` opens it twice, and natively each write there
    lands at its own offset."""
    try:
        st1, st2 = os.fstat(fd1), os.fstat(fd2)
    except OSError:
        return False
    if (st1.st_dev, st1.st_ino) != (st2.st_dev, st2.st_ino):
        return False
    if not stat.S_ISREG(st1.st_mode):
        return True
    shared = _kcmp_same_file(fd1, fd2)
    return _offset_is_shared(fd1, fd2) if shared is None else shared


def _kcmp_same_file(fd1: int, fd2: int) -> bool | None:
    """kcmp(2)'s answer, or None where the kernel does not have it (or forbids it)."""
    import ctypes  # only for a regular file as both stdout and stderr: loading it costs milliseconds
    import platform

    number = _KCMP_SYSCALL.get(platform.machine(), _KCMP_GENERIC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pid = os.getpid()
    result = libc.syscall(number, pid, pid, KCMP_FILE, fd1, fd2)
    return None if result < 0 else result == 0


def _offset_is_shared(fd1: int, fd2: int) -> bool:
    """Without kcmp: moving fd1's offset moves fd2's only if they share it. The offset is put back at
    once; no byte is written."""
    with contextlib.suppress(OSError):
        here = os.lseek(fd1, 0, os.SEEK_CUR)
        if os.lseek(fd2, 0, os.SEEK_CUR) != here:
            return False
        try:
            os.lseek(fd1, here + 1, os.SEEK_SET)
            return os.lseek(fd2, 0, os.SEEK_CUR) == here + 1
        finally:
            os.lseek(fd1, here, os.SEEK_SET)
    return False


def stdout_is_stderr() -> bool:
    """Whether the host's stdout and stderr are one stream (neither of them closed at start)."""
    return not _closed & {1, 2} and same_open_file(1, 2)

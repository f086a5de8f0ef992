"""The host side of the host-guest channel: every file the host and the guest exchange.

Each job has two directories in its private run directory. The control directory
carries what the host sends (the job file, stdin chunks, a changes archive); the
guest sees it read-only (a read-only bind for UML, a read-only 9p share for QEMU).
The report directory carries what the guest sends back (the exit status, how much
stdin it consumed). The guest may be root inside and the job malicious, so every
access here goes through a directory descriptor, never follows a link, never
blocks, creates with O_EXCL and reads at most a few bytes; anything unexpected
ends the job with GuestMisbehaved (exit 122) and one line that says what the
guest did.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from apppot.errors import GuestMisbehaved, HostError
from apppot.protocol import REPORT_LIMIT

CTL_DIR = "ctl"
OUT_DIR = "out"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src: int, dst: int, offset: int, size: int) -> None:
    """In the kernel where it can (a reflink on some filesystems), else through memory; stops early at the file's end."""
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src, dst, size - done, offset + done)
        except OSError:  # across filesystems on old kernels, or a filesystem without it
            data = os.pread(src, min(size - done, 1 << 20), offset + done)
            _write_all(dst, data)
            n = len(data)
        if n == 0:
            return
        done += n


class ChannelClosed(Exception):
    """The job's channel was closed: nothing more is sent or read."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "socket or device" if not stat.S_ISREG(mode) else "file"


class Channel:
    """The control and report directories of one job, held open by descriptor."""

    def __init__(self, rundir: Path) -> None:
        self.ctl = rundir / CTL_DIR
        self.out = rundir / OUT_DIR
        fds = []
        try:
            for path in (self.ctl, self.out):
                path.mkdir(mode=0o700)
                fds.append(os.open(path, _DIR_FLAGS))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise HostError(f"cannot make the job's control directories in {rundir}: {e.strerror}; check TMPDIR") from e
        self._ctl_fd, self._out_fd = fds
        # The stdin thread may still send after the job ended: a closed channel must not
        # let it use a descriptor number that now names something else.
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd in (self._ctl_fd, self._out_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed("the job has ended")

    def send(self, name: str, data: bytes) -> None:
        """Put a file in the control directory; it appears whole (written aside, then renamed)."""
        with self._lock:
            self._check_open()
            self._send(name, lambda fd: _write_all(fd, data))

    def send_copy(self, name: str, src_fd: int, offset: int, size: int) -> None:
        """Put ``size`` bytes of the regular file ``src_fd`` from ``offset`` in the control directory, like send."""
        with self._lock:
            self._check_open()
            self._send(name, lambda fd: _copy_range(src_fd, fd, offset, size))

    def _send(self, name: str, fill: Callable[[int], None]) -> None:
        tmp = f".{name}.tmp"
        try:
            fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=self._ctl_fd)
        except FileExistsError:
            raise GuestMisbehaved(f"the guest made {tmp} in the control directory, which only the host writes") from None
        try:
            fill(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=self._ctl_fd, dst_dir_fd=self._ctl_fd)

    def discard(self, name: str) -> None:
        """Remove a file the host sent, once the guest has consumed it."""
        with self._lock, contextlib.suppress(FileNotFoundError):
            self._check_open()
            os.unlink(name, dir_fd=self._ctl_fd)

    def has_report(self, name: str) -> bool:
        """Whether the guest has made ``name`` in the report directory (whatever it is)."""
        self._check_open()
        try:
            os.stat(name, dir_fd=self._out_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise GuestMisbehaved(f"the report {name} cannot be looked at ({e.strerror})") from None
        return True

    def read_report(self, name: str) -> bytes | None:
        """The bytes of the guest's report ``name`` (at most REPORT_LIMIT), or None if it has not made it."""
        where = f"{name} in the report directory"
        with self._lock:
            self._check_open()
            return self._read_report(name, where)

    def _read_report(self, name: str, where: str) -> bytes | None:
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self._out_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            with contextlib.suppress(OSError):
                mode = os.stat(name, dir_fd=self._out_fd, follow_symlinks=False).st_mode
                if not stat.S_ISREG(mode):
                    raise GuestMisbehaved(f"the guest left a {_kind(mode)} as {where}") from None
            raise GuestMisbehaved(f"the guest left {where} unreadable ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise GuestMisbehaved(f"the guest left a {_kind(st.st_mode)} as {where}")
            data = os.read(fd, REPORT_LIMIT + 1) if st.st_size <= REPORT_LIMIT else b""
            if st.st_size > REPORT_LIMIT or len(data) > REPORT_LIMIT:
                raise GuestMisbehaved(f"the guest wrote {max(st.st_size, len(data))} bytes to {where}, not a short number")
            return data
        finally:
            os.close(fd)

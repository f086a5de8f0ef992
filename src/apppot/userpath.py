"""Files the user names on the command line (--image, --cow, --console-log), opened so that nothing
can hang AppPot: never blocking (a FIFO without a writer would wait forever), and checked with fstat
on what was opened, so that a FIFO, a socket, a device or a directory is one line naming it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

from apppot.errors import AppPotError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def kind(mode: int) -> str:
    """What a file of this mode is, as a message says it: 'a named pipe (FIFO)', 'a directory', ..."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file" if stat.S_ISREG(mode) else "a special file")


def _refuse_kind(path: Path, what: str, error: type[AppPotError], fix: str) -> None:
    """After an open failed: if path is not a file (a socket gives ENXIO), that is the message."""
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what} {path} is {kind(mode)}, not a file; {fix}") from None


def open_for_reading(path: Path, what: str, error: type[AppPotError], fix: str, *, block_device: bool = False) -> BinaryIO:
    """path opened for reading: a regular file (or a block device, if allowed); anything else is
    error naming what and fix. OSErrors of the open itself are left to the caller, who knows the fix."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EISDIR):
            _refuse_kind(path, what, error, fix)
        raise
    _check_opened(fd, path, what, error, fix, block_device)
    return open(fd, "rb")


def open_for_writing(path: Path, what: str, error: type[AppPotError], fix: str) -> int:
    """A descriptor for writing path, created (0600) or truncated; a link, a FIFO, a socket or a
    directory is refused (character devices such as /dev/null are accepted); the descriptor blocks."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a job may have left a link under the name: never written through
            raise error(f"{what} {path} is a symbolic link; remove it, or {fix}") from None
        if e.errno in (errno.ENXIO, errno.EISDIR):
            _refuse_kind(path, what, error, fix)
        raise error(f"cannot write {what} {path}: {e.strerror}; {fix}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
        os.close(fd)
        raise error(f"{what} {path} is {kind(mode)}, not a file; {fix}")
    if stat.S_ISREG(mode):
        os.ftruncate(fd, 0)  # only now: truncating is done on what was checked
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def _check_opened(fd: int, path: Path, what: str, error: type[AppPotError], fix: str, block_device: bool) -> None:
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or (block_device and stat.S_ISBLK(mode)):
        return
    os.close(fd)
    raise error(f"{what} {path} is {kind(mode)}, not a file; {fix}")


def require_file(path: Path, what: str, error: type[AppPotError], fix: str) -> None:
    """An existing path given to another program (qemu-img, UML) must be a regular file; a missing one passes."""
    try:
        with open_for_reading(path, what, error, fix):
            pass
    except FileNotFoundError:
        pass
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}; {fix}") from None

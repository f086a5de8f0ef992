"""The job's standard streams: how the host's map into the guest, and the threads that carry them."""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any, NamedTuple

from apppot.hostfds import stdout_is_stderr
from apppot.protocol import StdinMode, StreamMode
from apppot.stdin import stdin_mode


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


def _readable(fd: int) -> bool:
    """False for a descriptor open only for writing (`0>>file`): the job reads it as empty, as a closed one."""
    import fcntl

    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY
    except OSError:
        return False


def _background_terminal(fd: int) -> bool:
    """A terminal whose foreground is another process group (`apppot start ... > out &` in a shell with job
    control): reading it would stop AppPot (SIGTTIN) though the job may never read; it reads as empty."""
    try:
        return os.isatty(fd) and os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False


def detect_streams(no_stdin: bool = False) -> Streams:
    """The host's streams; with ``no_stdin`` (-n) the job's stdin is /dev/null and the host's is never read."""
    interactive = not no_stdin and os.isatty(0) and os.isatty(1)

    def mode(fd: int) -> StreamMode:
        return StreamMode.TTY if os.isatty(fd) else StreamMode.PIPE

    if interactive:
        stdin = StdinMode.TTY
    elif no_stdin or _is_null_device(0) or not _readable(0) or _background_terminal(0):
        stdin = StdinMode.NULL
    else:
        stdin = stdin_mode(0)
    stderr = StreamMode.STDOUT if stdout_is_stderr() else mode(2)
    return Streams(stdin, mode(1), stderr, interactive)


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

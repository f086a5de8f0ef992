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


class TerminalState(NamedTuple):
    """The terminal's modes and the blocking of the open files on fds 0 and 1, as the shell left them."""

    fd: int
    attrs: list[Any]
    file_flags: dict[int, int]


def save_termios(fd: int) -> TerminalState | None:
    import fcntl
    import termios  # only interactive jobs need it; loading it costs a millisecond

    try:
        attrs = termios.tcgetattr(fd)
    except termios.error:
        return None
    flags = {}
    for std in (0, 1):
        with contextlib.suppress(OSError):
            flags[std] = fcntl.fcntl(std, fcntl.F_GETFL)
    return TerminalState(fd, attrs, flags)


def restore_termios(saved: TerminalState) -> None:
    import fcntl
    import termios

    with contextlib.suppress(termios.error, OSError):
        termios.tcsetattr(saved.fd, termios.TCSADRAIN, saved.attrs)
    for std, flags in saved.file_flags.items():  # a hypervisor may have made the shared file non-blocking
        with contextlib.suppress(OSError):
            fcntl.fcntl(std, fcntl.F_SETFL, flags)


def own_terminal_file(fd: int) -> int:
    """The terminal on ``fd`` opened anew, for writing: a file of its own, whose flags (QEMU makes its
    stdout non-blocking) never reach the file the user's shell shares with AppPot; else a duplicate."""
    with contextlib.suppress(OSError):
        return os.open(os.ttyname(fd), os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    return os.dup(fd)

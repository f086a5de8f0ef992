"""Stopping the test cluster's daemons by PID, and only them.

A pid file may be stale (the daemon died, its PID went to another process) or written by someone who
wants root to signal their victim. So a PID is signalled only through a pidfd opened before the check
that the process is the daemon expected: its executable's name and the user it runs as. The pid file
itself must be a small regular file (no link) of root or the daemon's user, writable by nobody else.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import signal
import socket
import stat
from pathlib import Path
from typing import NamedTuple

from apppot.proc import which
from apppot.say import Say

MAX_PID_FILE = 32  # bytes: a PID and a newline
STOP_WAIT = 10.0  # seconds between TERM and KILL
NOTICE_AFTER = 1.0  # seconds after TERM before `down` says it waits


class Daemon(NamedTuple):
    name: str  # what `down` reports: slurmctld, slurmd-n1, munged, arex, ...
    pid_file: Path
    program: str  # the file name of its executable (/proc/PID/exe)
    user: str = "root"

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid


class Outcome(NamedTuple):
    stopped: bool
    note: str | None = None  # why a PID was left alone


def read_pid_file(path: Path, owner_uid: int) -> int | str | None:
    """The PID in path; None if there is no such file; a reason (str) if the file is not to be trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path} cannot be opened safely ({e.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a regular file"
        if st.st_uid not in (0, owner_uid) or st.st_mode & 0o022:
            return f"{path} could have been written by another user"
        data = os.read(fd, MAX_PID_FILE + 1)
    finally:
        os.close(fd)
    text = data.decode("ascii", errors="replace").strip()
    if len(data) > MAX_PID_FILE or not text.isdigit() or int(text) < 2:
        return f"{path} does not hold a PID"
    return int(text)


def identity(pid: int) -> tuple[str, set[int]] | None:
    """The file name of the process's executable and its real, effective and saved user IDs; None if gone."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    uids = next((line.split()[1:4] for line in status.splitlines() if line.startswith("Uid:")), [])
    return os.path.basename(exe.removesuffix(" (deleted)")), {int(u) for u in uids}


def executable_names(program: str) -> set[str]:
    """The names program's executable may have: Debian installs /usr/sbin/slurmctld as a link to
    slurmctld-wlm, for one."""
    found = which(program) or os.path.join("/usr/sbin", program)
    return {program, os.path.basename(os.path.realpath(found))}


def is_daemon(pid: int, program: str, uid: int) -> str | None:
    """None if pid is the program running as uid, else what it is instead."""
    who = identity(pid)
    if who is None:
        return "no process"
    name, uids = who
    if name not in executable_names(program):
        return f"{name}, not {program}"
    if uids != {uid}:
        return f"{program} run by uid {', '.join(map(str, sorted(uids)))}, not {uid}"
    return None


def _wait_gone(pidfd: int, seconds: float) -> bool:
    return bool(select.select([pidfd], [], [], seconds)[0])  # a pidfd turns readable when the process ends


def stop_pid(pid: int, program: str, uid: int, say: Say | None = None, name: str | None = None) -> Outcome:
    """TERM (KILL after STOP_WAIT s) to pid if it is program running as uid; say, if given, hears
    what is stopped and what is waited for."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return Outcome(False)
    try:
        # Checked after the pidfd is open: a PID reused after this check cannot receive the signal.
        other = is_daemon(pid, program, uid)
        if other is not None:
            return Outcome(False, f"pid {pid} is {other}; left it alone")
        with contextlib.suppress(ProcessLookupError):
            if say:
                say(f"stopping {name or program} (pid {pid})")
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not _wait_gone(pidfd, NOTICE_AFTER):
                if say:
                    say(f"{name or program} has not ended 1 s after TERM; waiting up to {STOP_WAIT:.0f} s in all, then KILL")
                if not _wait_gone(pidfd, STOP_WAIT - NOTICE_AFTER):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    _wait_gone(pidfd, STOP_WAIT)
        return Outcome(True)
    finally:
        os.close(pidfd)


def stop(daemon: Daemon, remove_pid_file: bool = True, say: Say | None = None) -> Outcome:
    """Stop the daemon its pid file names, if the process is that daemon; the pid file goes too."""
    try:
        uid = daemon.uid
    except KeyError:
        return Outcome(False, f"{daemon.name}: there is no user {daemon.user} to run it; left its pid file alone")
    pid = read_pid_file(daemon.pid_file, uid)
    if pid is None:
        return Outcome(False)
    if isinstance(pid, str):
        return Outcome(False, f"{daemon.name}: {pid}; left it alone")
    outcome = stop_pid(pid, daemon.program, uid, say, daemon.name)
    if remove_pid_file:
        with contextlib.suppress(OSError):
            daemon.pid_file.unlink()
    return outcome._replace(note=f"{daemon.name}: {outcome.note}") if outcome.note else outcome


def processes_naming(program: str, uid: int, argument: str) -> list[int]:
    """The PIDs of program, run by uid, with argument among its command-line arguments."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if os.fsencode(argument) in argv and is_daemon(int(entry), program, uid) is None:
                found.append(int(entry))
    return found


def listening(port: int) -> bool:
    """Whether something accepts connections on this loopback port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0

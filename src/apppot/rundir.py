"""Per-job run directories: made private, held while the job runs, swept when their AppPot died.

A run directory holds the job's control and report directories (apppot.channel), the
temporary COW and UML's own files. The guest writes some of it, so it is removed
without following any link and without recursion, whatever the guest left there.
An AppPot killed by SIGKILL cannot remove its own: the next `apppot start` of the
same user does, once the lock its owner held is free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from apppot.errors import HostError

PREFIX = "apppot-"
# A run directory's whole name: PREFIX, the pid of its AppPot, a time stamp, an attempt. Nothing else is swept.
_NAME = re.compile(re.escape(PREFIX) + r"([0-9]{1,10})-[0-9]{9}-[0-9]{1,2}")
LOCK = "lock"  # held (flock) by the AppPot that made the directory, as long as it runs
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RunDir:
    """A new private directory for one job, locked until ``release``."""

    def __init__(self, base: Path) -> None:
        self.path = _make(base)
        # Locked before it appears under its name: another AppPot's sweep that finds it unlocked would
        # take the directory for abandoned and remove it under this job.
        new = self.path / f".{LOCK}.new"
        self._lock_fd: int | None = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        os.rename(new, self.path / LOCK)

    def release(self) -> None:
        """Remove the directory and let go of its lock."""
        # Processes of a guest just killed may still be ending and leave a file behind them: try again.
        for _ in range(40):
            with contextlib.suppress(OSError):
                remove_tree(str(self.path))
            if not os.path.lexists(self.path):
                break
            time.sleep(0.05)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _make(base: Path) -> Path:
    for attempt in range(100):
        path = base / f"{PREFIX}{os.getpid()}-{time.monotonic_ns() % 1_000_000_000:09d}-{attempt}"
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise HostError(f"cannot make a run directory under {base}: {e.strerror}; set TMPDIR to a writable place") from e
    raise HostError(f"cannot make a run directory under {base}; clean it up or set TMPDIR")


def sweep_stale(base: Path) -> list[str]:
    """Remove this user's run directories under ``base`` whose AppPot is gone; returns their names."""
    removed: list[str] = []
    try:
        entries = [e for e in os.scandir(base) if _NAME.fullmatch(e.name)]
    except OSError:
        return removed
    for entry in entries:
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and _abandoned(entry.path):
                remove_tree(entry.path)
                removed.append(entry.name)
    return removed


def _abandoned(path: str) -> bool:
    """Whether no running AppPot holds this run directory."""
    try:
        fd = os.open(os.path.join(path, LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return not _pid_alive(path)  # made by an older AppPot, or its owner has not locked it yet
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _pid_alive(path: str) -> bool:
    try:
        match = _NAME.fullmatch(os.path.basename(path))
        assert match is not None
        os.kill(int(match[1]), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def remove_tree(path: str) -> None:
    """Remove a directory tree without following a link in it and without recursion, ignoring what
    is already gone. Each directory met inside is first moved up to the top, so the depth the guest
    could nest to costs neither stack nor descriptors."""
    try:
        top = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            os.unlink(path)
            return
        raise
    try:
        serials = itertools.count()
        pending = _empty(top, top, serials)
        while pending:
            name = pending.pop()
            with contextlib.suppress(FileNotFoundError):
                fd = _open_dir(name, top)
                try:
                    pending += _empty(fd, top, serials)
                finally:
                    os.close(fd)
                os.rmdir(name, dir_fd=top)
    finally:
        os.close(top)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def _open_dir(name: str, parent: int) -> int:
    _open_up(name, parent)
    return os.open(name, _DIR_FLAGS, dir_fd=parent)


def _open_up(name: str, parent: int) -> None:
    """Give a directory the guest made unreadable or read-only (it is ours) the modes removing it needs:
    read to list it, write to empty it and to move it (its '..' changes)."""
    with contextlib.suppress(OSError):
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.chmod(f"/proc/self/fd/{handle}", 0o700)  # O_PATH: no permission needed to open it
        finally:
            os.close(handle)


def _empty(fd: int, top: int, serials: Iterator[int]) -> list[str]:
    """Unlink the files in ``fd`` and move its directories up into ``top``; returns their names there."""
    moved = []
    with os.scandir(fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        with contextlib.suppress(FileNotFoundError):
            if not is_dir:
                os.unlink(name, dir_fd=fd)
            elif fd == top:
                moved.append(name)
            else:
                _open_up(name, fd)
                moved.append(_move_up(name, fd, top, serials))
    return moved


def _move_up(name: str, fd: int, top: int, serials: Iterator[int]) -> str:
    while True:
        new = f".{PREFIX}rm-{next(serials)}"
        try:
            os.rename(name, new, src_dir_fd=fd, dst_dir_fd=top)
            return new
        except OSError as e:  # the name is taken (the guest may have made it): the next one
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise

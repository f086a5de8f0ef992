"""The --record file: checked before the job, written once when it ends, new and then renamed into place.

Its directory is opened when the job starts and the record is written through that descriptor, so
a job that replaces a directory on the way by a link (the file may be in the job directory) cannot
send the record elsewhere; below the job directory no link is followed even when it starts: one
there was left by a job, and is refused as the auto-merged changes archive's is (apppot.prepare).
The name itself is replaced in one rename, which never follows a link: no file but the one the
user named is ever written, and readers see the whole record or none.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from apppot.errors import UsageError
from apppot.userpath import kind

RECORD_START = b'{\n  "schema": "apppot-record/'  # how every record AppPot writes begins (indented JSON)
_FIX = "give --record (or APPPOT_RECORD) a new file or a regular file of yours"


class RecordFile:
    """The record's place: its directory held open from the start of the job, and its name in it."""

    def __init__(self, path: Path, jobdir: Path | None = None) -> None:
        self.path = path
        self.name = path.name
        if self.name in ("", ".", ".."):
            raise UsageError(f"--record {path} names a directory, not a file; {_FIX}")
        try:
            self.dir_fd = _open_directory(path.parent, jobdir)
        except _LinkInJobDir as e:
            raise UsageError(
                f"--record {path}: {e} in the job directory is a symbolic link, which AppPot does not follow "
                "(a job may have left it): give the record a path with no link in the job directory"
            ) from None
        except OSError as e:
            raise UsageError(
                f"--record {path}: cannot use its directory {path.parent} ({e.strerror}); create it, or name a file in another"
            ) from None
        try:
            self._check()
        except BaseException:
            os.close(self.dir_fd)
            raise

    def _check(self) -> None:
        """Refused before the job runs: a name that is a link, FIFO, directory or device, or a file that is
        not an earlier record (an image or a result named by mistake is never replaced); a directory not writable."""
        with contextlib.suppress(FileNotFoundError):
            mode = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False).st_mode
            if not stat.S_ISREG(mode):
                raise UsageError(f"--record {self.path} is {kind(mode)}, which AppPot does not replace; {_FIX}")
            if not self._holds_a_record():
                raise UsageError(
                    f"--record {self.path} exists and is not an AppPot record, which AppPot does not replace; {_FIX}"
                )
        if not os.access(".", os.W_OK, dir_fd=self.dir_fd):
            why = "read-only filesystem" if os.statvfs(self.dir_fd).f_flag & os.ST_RDONLY else "permission denied"
            raise UsageError(f"--record {self.path}: cannot write in {self.path.parent} ({why}); {_FIX}")

    def _holds_a_record(self) -> bool:
        """Empty, or a JSON document that begins as AppPot's records do (only its first bytes are read)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(self.name, flags, dir_fd=self.dir_fd)
        except OSError as e:
            raise UsageError(f"--record {self.path}: cannot read it ({e.strerror}); {_FIX}") from None
        try:
            head = os.read(fd, len(RECORD_START))
        finally:
            os.close(fd)
        return head in (b"", RECORD_START)

    def write(self, data: bytes) -> None:
        """Put data under the name in one rename, from a new file made beside it; raises OSError."""
        tmp = f".{self.name}.{secrets.token_hex(4)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644, dir_fd=self.dir_fd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)  # a full disk shows here on filesystems that allocate late, not after the rename
            finally:
                os.close(fd)
            os.rename(tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.dir_fd)
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.dir_fd)


class _LinkInJobDir(Exception):
    """A directory on the way to the record, below the job directory, is a link (its path is the message)."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_WAY_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC  # a directory on the way needs search permission only


def _open_directory(directory: Path, jobdir: Path | None) -> int:
    """A descriptor of ``directory``, opened a component at a time from /. The user's links are followed
    until the job directory is reached (known by its inode, whatever path names it); below it none is."""
    inside = None
    if jobdir is not None:
        with contextlib.suppress(OSError):
            st = os.stat(jobdir)
            inside = (st.st_dev, st.st_ino)
    absolute = Path(os.path.normpath(Path.cwd() / directory))  # lexical: a '..' is never taken after a link
    fd = os.open("/", _WAY_FLAGS)
    below = False
    try:
        for depth, part in enumerate(absolute.parts[1:], start=2):
            st = os.fstat(fd)
            below = below or (st.st_dev, st.st_ino) == inside
            try:
                step = os.open(part, _WAY_FLAGS | (os.O_NOFOLLOW if below else 0), dir_fd=fd)
            except OSError as e:
                if (
                    below
                    and e.errno in (errno.ELOOP, errno.ENOTDIR)
                    and os.path.islink(part_path := Path(*absolute.parts[:depth]))
                ):
                    raise _LinkInJobDir(str(part_path)) from None
                raise
            os.close(fd)
            fd = step
        return os.open(".", _DIR_FLAGS, dir_fd=fd)  # the record's directory itself, readable as before
    finally:
        os.close(fd)


def strerror(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "its directory is gone"
    if e.errno == errno.EISDIR:
        return "a directory now has its name"
    return e.strerror or str(e)

"""Copying a job's results out of the directory it wrote: the trust boundary of `apppot fetch`.

Everything in a staged job directory was written by the job (the guest is root inside), so it is
hostile input. Each name is resolved from a directory descriptor one component at a time with
O_NOFOLLOW; only regular files are copied, with a size cap, and never through a link. Links,
FIFOs, sockets, devices and directories are refused by name: a link is not copied as a link either,
since a link into the user's results pointing at the user's own files is the very trap. On the
user's side, files are created with O_EXCL, or (when the user asked to replace) written beside
and renamed over the old entry, which replaces a link there rather than writing through it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
from typing import NamedTuple

from apppot.errors import UsageError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Non-blocking: a FIFO swapped in after the check must not hang the open.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
CHUNK = 1 << 20
DEFAULT_LIMIT = 16 << 30  # per file: a job's results are its business, a disk filled with them is not


class Refused(NamedTuple):
    name: str
    reason: str


class CopyReport(NamedTuple):
    copied: list[str]
    missing: list[str]
    refused: list[Refused]


class Refusal(Exception):
    """One name cannot be copied; the reason is for the user."""


class Missing(Exception):
    """The name is not there (yet)."""


def kind(mode: int) -> str:
    """What a non-regular file is, in the words of a refusal."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "not a regular file"


def _parts(name: str) -> list[str]:
    parts = list(PurePosixPath(name).parts)
    if not parts or parts[0] == "/" or ".." in parts or "." in name.split("/"):
        raise Refusal("not a plain relative path")
    return parts


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def open_directory(parent: int, name: str) -> int:
    """A directory under parent, never through a link."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        raise Missing() from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            raise Refusal(f"{name!r} on its path is {kind(st.st_mode)}") from None
        raise


def open_regular_file(root: int, name: str) -> tuple[int, os.stat_result]:
    """The regular file name (a relative path) under root and its status, opened without following
    any link on the way; other kinds are refused before they are opened (opening a device or a
    FIFO can itself have effects)."""
    *directories, last = _parts(name)
    parent = os.dup(root)
    try:
        for directory in directories:
            inner = open_directory(parent, directory)
            os.close(parent)
            parent = inner
        try:
            seen = os.stat(last, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise Missing() from None
        if not stat.S_ISREG(seen.st_mode):
            raise Refusal(kind(seen.st_mode))
        try:
            fd = os.open(last, FILE_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            raise Missing() from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO):
                raise Refusal("replaced by a link or a socket while being fetched") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
            os.close(fd)
            raise Refusal(f"replaced while being fetched (now {kind(st.st_mode)})")
        return fd, st
    finally:
        os.close(parent)


def _destination_directory(root: int, name: str) -> int:
    """The directory for name under the user's root, made if missing, never through a link."""
    parent = os.dup(root)
    try:
        for directory in _parts(name)[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o777, dir_fd=parent)
            try:
                inner = os.open(directory, DIR_FLAGS, dir_fd=parent)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Refusal(f"{directory!r} in your directory is in the way (not a directory of its own)") from None
                raise
            os.close(parent)
            parent = inner
    except BaseException:
        os.close(parent)
        raise
    return parent


def parse_size(text: str) -> int:
    """'16G', '500M', '4096' (bytes) -> bytes."""
    number, unit = text[:-1], text[-1:].upper()
    if unit.isdigit():
        number, unit = text, ""
    if not number.isdigit() or unit not in ("", "K", "M", "G", "T"):
        raise UsageError(f"invalid size {text!r}: write it like 500M or 16G")
    return int(number) << (10 * ("", "K", "M", "G", "T").index(unit))


def _copy_bytes(source: int, target: int, limit: int) -> int:
    """Copy at most limit bytes (a file that grows past it while copied is refused); returns the count."""
    total = 0
    while True:
        data = os.read(source, min(CHUNK, limit + 1 - total))
        if not data:
            return total
        total += len(data)
        if total > limit:
            raise Refusal(f"larger than {limit} bytes (fetch it with a higher --max-size)")
        view = memoryview(data)
        while view:
            view = view[os.write(target, view) :]


def copy_one(source_root: int, name: str, target_root: int, *, limit: int, replace: bool) -> None:
    """Copy the regular file name from source_root to the same name under target_root."""
    fd, st = open_regular_file(source_root, name)
    with _fd(fd):
        if st.st_size > limit:
            raise Refusal(f"{st.st_size} bytes, larger than {limit} (fetch it with a higher --max-size)")
        with _fd(_destination_directory(target_root, name)) as directory:
            free = os.statvfs(directory)
            if st.st_size > free.f_bavail * free.f_frsize:
                raise Refusal(f"{st.st_size} bytes, more than the free space where it would go")
            last = _parts(name)[-1]
            mode = 0o777 if st.st_mode & stat.S_IXUSR else 0o666  # the umask applies; never set-id bits
            written = f".{last}.apppot-{secrets.token_hex(4)}" if replace else last
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                out = os.open(written, flags, mode, dir_fd=directory)
            except FileExistsError:
                raise Refusal("already in your directory (fetch with --force to replace it)") from None
            try:
                with _fd(out):
                    _copy_bytes(fd, out, limit)
                    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                if replace:
                    os.replace(written, last, src_dir_fd=directory, dst_dir_fd=directory)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(written, dir_fd=directory)
                raise


def copy_results(source_root: int, names: Sequence[str], target_root: int, *, limit: int, replace: bool) -> CopyReport:
    """Copy each of names (relative paths) from the job's directory to the user's: what was copied,
    what is not there, and what was refused and why."""
    report = CopyReport([], [], [])
    for name in names:
        try:
            copy_one(source_root, name, target_root, limit=limit, replace=replace)
        except Missing:
            report.missing.append(name)
        except Refusal as e:
            report.refused.append(Refused(name, str(e)))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                report.refused.append(Refused(name, "no space left where it would go"))
            else:
                report.refused.append(Refused(name, e.strerror or str(e)))
        else:
            report.copied.append(name)
    return report

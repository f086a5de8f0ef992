#!/usr/bin/python3
"""apppot-snap: a system's base state, the changes made since, and merging them elsewhere.

    apppot-snap base                  record the whole system's state as its base
    apppot-snap changes [FILE]        pack what differs from the base (default: into the job directory)
    apppot-snap merge FILE            apply such an archive to this system
    apppot-snap manifest FILE         write the system's current state (to compare two systems)

One stdlib-only module: the host imports it (checking and showing archives), and images carry it
as /usr/sbin/apppot-snap. The agent merges archives at boot with sh and tar alone.

A manifest lists every path of the system (not crossing mount points, without /proc, /sys, /dev,
/run, /tmp, the job directory and the paths in /etc/apppot/snap.exclude) with its type, mode,
owner, size, mtime and content digest (or link target). A changes archive is a tar.gz whose first
member, .apppot-changes.json, names the base it was made against and the deletions; the other
members are the new and changed files, directories and links, relative to /, with numeric owners.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

VERSION = "1"
STATE_DIR = "/var/lib/apppot"
BASE_MANIFEST = f"{STATE_DIR}/base.manifest.gz"
BASE_ID = f"{STATE_DIR}/base.id"
EXCLUDE_FILE = "/etc/apppot/snap.exclude"
MANIFEST_MEMBER = ".apppot-changes.json"
JOB_DIR = "/home/user/job"
DEFAULT_CHANGES_NAME = "apppot.{date}.changes.tar.gz"
# Never part of a system's state: kernel views, scratch space, the job directory, our own state.
ALWAYS_EXCLUDED = ("/proc", "/sys", "/dev", "/run", "/tmp", JOB_DIR, STATE_DIR, "/" + MANIFEST_MEMBER, "/lost+found")
# Shipped in images as /etc/apppot/snap.exclude, which the image's owner may edit.
DEFAULT_EXCLUDES = """\
# Paths apppot-snap leaves out of base states and changes, one per line (subtrees included).
/var/cache/apt
/var/lib/apt/lists
/var/log
/var/tmp
/var/cache/debconf/templates.dat-old
/etc/resolv.conf
/etc/sudoers.d/apppot
/root/.cache
/home/user/.cache
"""
FILE, DIR, LINK, OTHER = "f", "d", "l", "o"


class SnapError(Exception):
    """A problem apppot-snap explains in one line."""


class Entry(NamedTuple):
    path: str  # absolute, in the system
    kind: str  # FILE, DIR, LINK, OTHER
    mode: int  # permission bits, with setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    mtime: int  # seconds
    content: str  # sha256 of a file, target of a link, "" otherwise

    def same_content(self, other: Entry) -> bool:
        return self.kind == other.kind and self.content == other.content

    def same_meta(self, other: Entry) -> bool:
        return (self.mode, self.uid, self.gid) == (other.mode, other.uid, other.gid)


class Manifest(NamedTuple):
    id: str
    created: str
    entries: dict[str, Entry]
    epoch: int = 0  # when it was recorded


class Changes(NamedTuple):
    added: list[Entry]
    modified: list[Entry]  # content or type changed
    meta: list[Entry]  # only mode or owner changed
    deleted: list[str]  # top-most deleted paths; also paths whose type changed (removed, then packed)

    def packed(self) -> list[Entry]:
        return sorted([*self.added, *self.modified, *self.meta], key=lambda e: e.path)


# --- manifests ----------------------------------------------------------------------------------


def read_excludes(root: str = "/") -> list[str]:
    paths = list(ALWAYS_EXCLUDED)
    try:
        text = Path(root, EXCLUDE_FILE.lstrip("/")).read_text()
    except FileNotFoundError:
        text = DEFAULT_EXCLUDES
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            paths.append("/" + line.strip("/"))
    return paths


def is_excluded(path: str, excludes: Iterable[str]) -> bool:
    return any(path == x or path.startswith(x.rstrip("/") + "/") for x in excludes)


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry(path: str, real: str, st: os.stat_result, known: dict[str, Entry] | None, racy: int) -> Entry:
    mode = stat.S_IMODE(st.st_mode)
    mtime = int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        old = known.get(path) if known else None
        # Unchanged size and mtime: the content is taken as unchanged (as rsync does); --checksum hashes
        # all. Times are whole seconds (mkfs.ext4 -d keeps no more), so a file whose time is not before
        # the base was recorded may have changed within that second: it is hashed.
        if old is not None and old.kind == FILE and (old.size, old.mtime) == (st.st_size, mtime) and mtime < racy:
            content = old.content
        else:
            content = _digest(real)
        return Entry(path, FILE, mode, st.st_uid, st.st_gid, st.st_size, mtime, content)
    if stat.S_ISDIR(st.st_mode):
        return Entry(path, DIR, mode, st.st_uid, st.st_gid, 0, 0, "")
    if stat.S_ISLNK(st.st_mode):
        return Entry(path, LINK, 0, st.st_uid, st.st_gid, 0, 0, os.readlink(real))
    return Entry(path, OTHER, mode, st.st_uid, st.st_gid, 0, 0, f"{stat.S_IFMT(st.st_mode):o}")


def scan(
    root: str = "/", excludes: list[str] | None = None, known: dict[str, Entry] | None = None, known_since: int = 0
) -> dict[str, Entry]:
    """Every path of the system under root, not crossing mount points, without the excluded ones.

    known: a base's entries, whose digests are reused for files with the same size and mtime
    (earlier than known_since, the epoch second the base was recorded)."""
    excludes = read_excludes(root) if excludes is None else excludes
    root_dev = os.lstat(root).st_dev
    entries: dict[str, Entry] = {}
    todo = ["/"]
    while todo:
        directory = todo.pop()
        real_dir = os.path.join(root, directory.lstrip("/"))
        try:
            children = sorted(os.scandir(real_dir), key=lambda d: d.name)
        except OSError as e:
            raise SnapError(f"cannot read {directory}: {e.strerror}") from e
        for child in children:
            path = posixpath.join(directory, child.name)
            if is_excluded(path, excludes):
                continue
            st = child.stat(follow_symlinks=False)
            if st.st_dev != root_dev or stat.S_ISSOCK(st.st_mode):
                continue  # another filesystem mounted here; sockets belong to running programs
            entries[path] = _entry(path, child.path, st, known, known_since)
            if stat.S_ISDIR(st.st_mode):
                todo.append(path)
    return entries


def _lines(entries: dict[str, Entry]) -> Iterator[str]:
    for path in sorted(entries):
        yield json.dumps(list(entries[path]), ensure_ascii=True)


def write_manifest(entries: dict[str, Entry], target: str) -> Manifest:
    """Write a manifest (gzip, a JSON header line, then one JSON array per path); returns it with its id."""
    lines = list(_lines(entries))
    ident = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    epoch = int(time.time())
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    header = json.dumps({"apppot_snap": VERSION, "id": ident, "created": created, "epoch": epoch, "entries": len(lines)})
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".tmp"
    with gzip.open(tmp, "wt", compresslevel=6) as f:
        f.write(header + "\n")
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, target)
    return Manifest(ident, created, entries, epoch)


def read_manifest(source: str) -> Manifest:
    try:
        with gzip.open(source, "rt") as f:
            header = json.loads(f.readline())
            entries = {}
            for line in f:
                fields = json.loads(line)
                entry = Entry(*fields)
                entries[entry.path] = entry
    except FileNotFoundError:
        raise SnapError(f"no base state at {source}: record one with 'apppot-snap base'") from None
    except (OSError, ValueError, TypeError, EOFError, zlib.error, RecursionError) as e:
        raise SnapError(f"the base state {source} is damaged ({e}); record it again with 'apppot-snap base'") from e
    return Manifest(str(header.get("id")), str(header.get("created")), entries, int(header.get("epoch", 0)))


# --- differences --------------------------------------------------------------------------------


def diff(base: dict[str, Entry], now: dict[str, Entry]) -> Changes:
    """What turns the base into now."""
    added, modified, meta, gone = [], [], [], []
    for path, entry in now.items():
        old = base.get(path)
        if old is None:
            added.append(entry)
        elif old.kind != entry.kind:
            modified.append(entry)
            gone.append(path)  # removed first: a file does not turn into a directory by extraction
        elif not old.same_content(entry):
            modified.append(entry)
            if entry.kind == LINK:
                gone.append(path)  # tar replaces files but not every link
        elif not old.same_meta(entry) or old.mtime != entry.mtime:
            meta.append(entry)
    gone += [path for path in base if path not in now]
    return Changes(added, modified, meta, topmost(gone))


def topmost(paths: Iterable[str]) -> list[str]:
    """The paths without those inside another of them, deepest first."""
    unique = set(paths)

    def inside_another(path: str) -> bool:
        parts = path.split("/")
        return any("/".join(parts[:i]) in unique for i in range(2, len(parts)))

    return sorted((p for p in unique if not inside_another(p)), key=lambda p: (-p.count("/"), p))


# --- archives -----------------------------------------------------------------------------------


class ArchiveInfo(NamedTuple):
    base: str
    created: str
    tool: str
    deleted: list[str]
    added: list[str]
    modified: list[str]


def write_changes(changes: Changes, base_id: str, target: str, root: str = "/", verbose: bool = False) -> ArchiveInfo:
    """Pack the changes into a tar.gz with the manifest first; written atomically."""
    info = ArchiveInfo(
        base=base_id,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        tool=f"apppot-snap {VERSION}",
        deleted=changes.deleted,
        added=sorted(e.path for e in changes.added),
        modified=sorted(e.path for e in [*changes.modified, *changes.meta]),
    )
    for entry in changes.packed():
        if entry.kind == OTHER and not stat.S_ISFIFO(int(entry.content, 8)):
            raise SnapError(f"{entry.path} is a device file, which a changes archive cannot carry; remove it or exclude it")
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        _write_archive(changes, info, tmp, root, verbose)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return info


def _write_archive(changes: Changes, info: ArchiveInfo, tmp: str, root: str, verbose: bool) -> None:
    with tarfile.open(tmp, "x:gz", format=tarfile.PAX_FORMAT) as tar:
        data = json.dumps({"format": "apppot-changes", **info._asdict()}, indent=1).encode()
        member = tarfile.TarInfo(MANIFEST_MEMBER)
        member.size, member.mtime, member.mode = len(data), int(time.time()), 0o644
        tar.addfile(member, io.BytesIO(data))
        for entry in changes.packed():
            real = os.path.join(root, entry.path.lstrip("/"))
            member = tar.gettarinfo(real, arcname=entry.path.lstrip("/"))
            member.uname = member.gname = ""  # numeric owners: names may differ until /etc/passwd is merged
            if member.type == tarfile.LNKTYPE:  # a hard link to a file packed before: store it whole
                member.type, member.linkname, member.size = tarfile.REGTYPE, "", os.lstat(real).st_size
            if verbose:
                print(entry.path)
            if member.isreg():
                with open(real, "rb") as f:
                    tar.addfile(member, f)
            else:
                tar.addfile(member)


# --- reading archives (a job may have made them: every byte is hostile) ---------------------------

MAX_SIZE_ENV = "APPPOT_CHANGES_MAX_SIZE"
DEFAULT_MAX_SIZE = 4 << 30  # bytes of the expanded (uncompressed) tar stream
MAX_MEMBERS = 1_000_000
MAX_HEADER = 1 << 20  # one pax or GNU long-name header, which tarfile reads whole into memory
MAX_MANIFEST = 64 << 20
MAX_MANIFEST_LISTS = 64  # brackets in the manifest: it is one object of flat lists, so json never nests deep
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_CHUNK = 1 << 20


def _clean_relative(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and not _CONTROL.search(name) and name not in (".", "./")


def max_size() -> int:
    """The largest expanded archive read: $APPPOT_CHANGES_MAX_SIZE (bytes, or a number with K, M, G, T), else 4 GiB."""
    text = os.environ.get(MAX_SIZE_ENV, "").strip()
    match = re.fullmatch(r"(\d+)([KMGT]?)", text, re.IGNORECASE)
    if not text:
        return DEFAULT_MAX_SIZE
    if match is None:
        raise SnapError(f"{MAX_SIZE_ENV}={text!r} is not a size; give bytes, or a number with K, M, G or T")
    return int(match[1]) << (10 * ("KMGT".index(match[2].upper()) + 1) if match[2] else 0)


class _Refused(Exception):
    """A member tarfile must not go on reading; a SnapError once the archive is named."""


class _Header(tarfile.TarInfo):
    """Headers as tarfile reads them, except what GNU tar would read differently (sparse files: their map
    and GNU.sparse.name) and extended headers too large to hold in memory."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
        if self.type in extended and self.size > MAX_HEADER:
            raise _Refused(f"has a header of more than {MAX_HEADER} bytes: refused")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused(f"member {self.name!r} is a sparse file (apppot-snap stores files whole): refused")
        return super()._proc_member(archive)  # type: ignore[misc,no-any-return]

    def _proc_gnusparse_00(self, member: tarfile.TarInfo, pax: dict[str, str], *_: object) -> None:
        name = pax.get("GNU.sparse.name", pax.get("path", member.name))
        raise _Refused(f"member {name!r} is a sparse file (apppot-snap stores files whole): refused")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


class _Expanded:
    """The archive's tar stream, gunzipped if it is gzipped, as tarfile reads it: never more than limit
    bytes. Read to its end, the gzip trailer (CRC and length) is checked."""

    def __init__(self, source: str, raw: io.BufferedReader, limit: int) -> None:
        self.source, self.limit, self.count = source, limit, 0
        gzipped = raw.peek(2)[:2] == b"\x1f\x8b"
        self._stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw

    def read(self, size: int = -1, /) -> bytes:
        try:
            data = self._stream.read(_CHUNK if size < 0 else min(size, _CHUNK))
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            why = str(e) or type(e).__name__
            raise SnapError(
                f"{self.source} is damaged ({why}): copy it again, or make it again with apppot-snap changes"
            ) from None
        except OSError as e:
            raise SnapError(f"cannot read {self.source}: {e.strerror}") from None
        self.count += len(data)
        if self.count > self.limit:
            raise _too_large(self.source, self.limit)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def write(self, b: bytes, /) -> int:
        raise io.UnsupportedOperation("write")

    def tell(self) -> int:
        return self.count

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("seek")

    def close(self) -> None:
        self._stream.close()


def _too_large(source: str, limit: int) -> SnapError:
    return SnapError(
        f"{source} expands to more than {limit} bytes ({_human(limit)}), the limit: "
        f"make a smaller archive, or raise {MAX_SIZE_ENV}"
    )


def _human(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"


@contextlib.contextmanager
def _reading(source: str, limit: int) -> Iterator[tuple[tarfile.TarFile, _Expanded]]:
    """The archive as a stream of members, read once and in order; problems reading it are SnapErrors
    (those of the caller's own writing are not caught)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block us
    except FileNotFoundError:
        raise SnapError(f"changes archive {source} does not exist; give the file apppot-snap changes made") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # what opening a socket gives
            raise SnapError(f"changes archive {source} is a socket, not a file; give the archive apppot-snap made") from None
        raise SnapError(f"changes archive {source} cannot be read ({e.strerror}); give a file you can read") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before open(): a directory would make it raise
        os.close(fd)
        raise SnapError(f"changes archive {source} is not a file; give the tar.gz apppot-snap changes made")
    with open(fd, "rb") as raw:
        expanded = _Expanded(source, raw, limit)
        try:
            with tarfile.open(fileobj=expanded, mode="r|", tarinfo=_Header) as tar:
                yield tar, expanded
        except _Refused as e:
            raise SnapError(f"{source}: {e}") from None
        except (tarfile.TarError, UnicodeError) as e:
            raise _unreadable(source, e) from None


def _unreadable(source: str, e: BaseException) -> SnapError:
    why = (str(e).splitlines() or [type(e).__name__])[0].rstrip(":")
    return SnapError(f"{source} is not a readable tar.gz archive ({why}); give an archive made by apppot-snap changes")


def check_archive(source: str) -> tuple[ArchiveInfo, list[tarfile.TarInfo]]:
    """Read and check a changes archive without extracting anything; every problem is a SnapError
    naming the offending member."""
    return _scan(source, max_size())


def _scan(source: str, limit: int, room: tuple[int, str] | None = None) -> tuple[ArchiveInfo, list[tarfile.TarInfo]]:
    """The first reading: the manifest and the members' headers, checked; their expanded size within
    limit (and room: the free bytes of the directory the copy goes to); the gzip read to its end."""
    with _reading(source, limit) as (tar, expanded):
        members = iter(tar)
        first = next(members, None)
        if first is None or first.name != MANIFEST_MEMBER or not first.isreg():
            raise SnapError(f"{source} has no {MANIFEST_MEMBER} first: it was not made by apppot-snap changes")
        if first.size > MAX_MANIFEST:
            raise SnapError(f"{source}: {MANIFEST_MEMBER} is larger than {MAX_MANIFEST} bytes: refused")
        extracted = tar.extractfile(first)
        assert extracted is not None
        info = _parse_manifest(source, extracted.read())
        checked: list[tarfile.TarInfo] = []
        total = tarfile.RECORDSIZE  # the end of the archive, padded
        for m in members:
            if len(checked) >= MAX_MEMBERS:
                raise SnapError(f"{source} has more than {MAX_MEMBERS} members: refused")
            _check_member(source, m)
            fresh = _fresh(m)
            total += len(fresh.tobuf(tarfile.PAX_FORMAT)) + -(-fresh.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if total > limit:
                raise _too_large(source, limit)
            if room and total > room[0]:
                raise SnapError(
                    f"{source} expands to at least {total} bytes ({_human(total)}), more than the {room[0]} bytes free "
                    f"in {room[1]}: free space there, or set TMPDIR to a larger filesystem"
                )
            checked.append(m)
        expanded.drain()
    _check_members(source, info, checked)
    return info, checked


_Handler = Callable[[tarfile.TarFile, tarfile.TarInfo], None]


def _replay(source: str, limit: int, checked: list[tarfile.TarInfo], each: _Handler) -> None:
    """The second reading: each member again, the same as it was checked (or the file changed meanwhile:
    refused), handed to each with the tar its data can be read from."""
    with _reading(source, limit) as (tar, expanded):
        members = iter(tar)
        next(members, None)  # the manifest
        for old in [*checked, None]:
            m = next(members, None)
            if (m and _fields(m)) != (old and _fields(old)):
                raise SnapError(f"{source} changed while it was read: refused; give it again")
            if m is not None:
                each(tar, m)
        expanded.drain()


def _fields(m: tarfile.TarInfo) -> tuple[object, ...]:
    return m.name, m.type, m.mode, m.uid, m.gid, m.size, m.mtime, m.linkname


def _fresh(m: tarfile.TarInfo) -> tarfile.TarInfo:
    """A new header with only the checked fields: no pax record, owner name or sparse map of the original."""
    fresh = tarfile.TarInfo(m.name)
    fresh.type = tarfile.REGTYPE if m.isreg() else m.type
    fresh.mode = m.mode & 0o7777
    fresh.uid, fresh.gid, fresh.mtime = m.uid, m.gid, int(m.mtime)
    fresh.size = m.size if m.isreg() else 0
    fresh.linkname = m.linkname if m.issym() else ""
    return fresh


def _check_member(source: str, m: tarfile.TarInfo) -> None:
    """What one member's header alone must satisfy: checked before its data is read."""
    what = f"{source}: member {m.name!r}"
    if _CONTROL.search(m.name):
        raise SnapError(f"{what} has a newline or other control character in its name: refused")
    if m.issym() and _CONTROL.search(m.linkname):
        raise SnapError(f"{what} is a link whose target has a newline or other control character: refused")
    if m.sparse is not None or any(key.startswith("GNU.sparse.") for key in m.pax_headers):
        raise SnapError(f"{what} is a sparse file (apppot-snap stores files whole): refused")
    if not (0 <= m.uid < 0xFFFFFFFF and 0 <= m.gid < 0xFFFFFFFF):
        raise SnapError(f"{what} has an owner out of range ({m.uid}:{m.gid}): refused")
    if not abs(m.mtime) < 8**11:  # a pax mtime may be any float: nan, inf
        raise SnapError(f"{what} has a time out of range ({m.mtime}): refused")


def _check_members(source: str, info: ArchiveInfo, members: list[tarfile.TarInfo]) -> None:
    names: set[str] = set()
    links: set[str] = set()
    for m in members:
        name = m.name.rstrip("/") if m.isdir() else m.name
        what = f"{source}: member {m.name!r}"
        if not _clean_relative(name) or "//" in name or name.startswith("./") or "/./" in name or name.endswith("/."):
            raise SnapError(f"{what} has an absolute path, '..', '.', '//' or a newline: refused")
        if name == MANIFEST_MEMBER or name in names:
            raise SnapError(f"{what} appears twice: refused")
        if _reserved(name, symlink=m.issym()):
            raise SnapError(
                f"{what} is in a part of the system apppot-snap never changes ({_reserved(name, m.issym())}): refused"
            )
        parents = ["/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1)]
        if any(p in links for p in parents):
            raise SnapError(f"{what} lies under a link the archive itself makes: refused")
        if m.ischr() or m.isblk():
            raise SnapError(f"{what} is a device file: refused")
        if m.islnk():
            raise SnapError(f"{what} is a hard link: refused (apppot-snap stores files whole)")
        if m.issym() and not m.linkname.startswith("/"):
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
            if resolved == ".." or resolved.startswith("../"):
                raise SnapError(f"{what} is a link pointing outside the system ({m.linkname}): refused")
        if not (m.isreg() or m.isdir() or m.issym() or m.isfifo()):
            raise SnapError(f"{what} is of an unsupported type: refused")
        names.add(name)
        if m.issym():
            links.add(name)
    for m in members:
        if m.issym() and not m.linkname.startswith("/"):
            prefix = posixpath.dirname(m.name)
            for part in m.linkname.split("/"):
                prefix = posixpath.normpath(posixpath.join(prefix, part))
                if prefix in links and prefix != m.name:
                    raise SnapError(
                        f"{source}: member {m.name!r} is a link resolved through another link of the archive: refused"
                    )
    for path in info.deleted:
        relative = path[1:]
        if not path.startswith("/") or not _clean_relative(relative) or path.endswith("/") or "//" in path or "/./" in path:
            raise SnapError(f"{source}: deletion {path!r} is not a clean absolute path: refused")
        if _reserved(relative, symlink=True):
            raise SnapError(f"{source}: deletion {path!r} is in or above a part of the system apppot-snap never changes: refused")
    claimed = {p.lstrip("/") for p in [*info.added, *info.modified]}
    if claimed != names:
        extra = sorted(names - claimed)[:3] or sorted(claimed - names)[:3]
        raise SnapError(f"{source}: its manifest does not list exactly its members (e.g. {', '.join(extra)}): refused")


def _reserved(name: str, symlink: bool) -> str | None:
    """The always-excluded path that name lies in, or (for links and deletions, which redirect or remove
    everything below them) lies above; None if it is free."""
    path = "/" + name
    for excluded in ALWAYS_EXCLUDED:
        if path == excluded or path.startswith(excluded + "/"):
            return excluded
        if symlink and excluded.startswith(path + "/"):
            return excluded
    return None


def repack(source: str, target: str) -> ArchiveInfo:
    """Check the archive, then write what was checked for the guest's tar: fresh headers with only the
    checked fields, uncompressed, without the manifest. Nothing is written unless the whole archive is
    sound and fits in the free space; a failure leaves no target."""
    limit = max_size()
    directory = os.path.dirname(os.path.abspath(target))
    try:
        fs = os.statvfs(directory)
    except OSError as e:
        raise SnapError(f"cannot use {directory} for a copy of {source}: {e.strerror}") from None
    info, checked = _scan(source, limit, (fs.f_bavail * fs.f_frsize, directory))
    try:
        copy = open(target, "xb")  # noqa: SIM115 (closed by the with below; an existing target is refused)
    except OSError as e:
        raise SnapError(f"cannot write {target}: {e.strerror}") from None

    def write(tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        out.addfile(_fresh(m), tar.extractfile(m) if m.isreg() else None)

    try:
        with copy, tarfile.open(fileobj=copy, mode="w", format=tarfile.PAX_FORMAT) as out:
            _replay(source, limit, checked, write)
    except BaseException as e:
        os.unlink(target)
        if isinstance(e, OSError):
            raise SnapError(f"cannot write {target}: {e.strerror or e}") from None
        raise
    return info


def _parse_manifest(source: str, data: bytes) -> ArchiveInfo:
    lists = _JSON_STRING.sub(b"", data)
    if lists.count(b"[") + lists.count(b"{") > MAX_MANIFEST_LISTS:
        raise SnapError(f"{source}: {MANIFEST_MEMBER} is malformed (nested or too many lists); make the archive again")
    try:
        doc = json.loads(data)
        if doc.get("format") != "apppot-changes":
            raise ValueError("format is not apppot-changes")
        info = ArchiveInfo(**{k: doc[k] for k in ArchiveInfo._fields})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SnapError(f"{source}: {MANIFEST_MEMBER} is malformed ({e}); make the archive again") from None
    if not isinstance(info.base, str) or not all(isinstance(v, list) for v in (info.deleted, info.added, info.modified)):
        raise SnapError(f"{source}: {MANIFEST_MEMBER} is malformed (wrong types); make the archive again")
    if not all(isinstance(p, str) for p in [*info.deleted, *info.added, *info.modified]):
        raise SnapError(f"{source}: {MANIFEST_MEMBER} is malformed (paths must be strings); make the archive again")
    return info


def merge(source: str, root: str = "/", force: bool = False, base_id: str | None = None) -> ArchiveInfo:
    """Apply a checked archive: deletions first, then the members with their modes and owners."""
    limit = max_size()
    info, checked = _scan(source, limit)
    if base_id is None:
        base_id = _read_base_id(root)
    if info.base != base_id and not force:
        raise SnapError(
            f"{source} was made against base {info.base[:16]}, this system is base {base_id[:16]}: "
            "merge it onto the system it was made for, or pass --force"
        )
    for path in info.deleted:
        _remove(os.path.join(root, path.lstrip("/")))

    def extract(tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        target = os.path.join(root, m.name)
        if (os.path.lexists(target) and not os.path.isdir(target)) or (os.path.isdir(target) and not m.isdir()):
            _remove(target)
        tar.extract(m, root, numeric_owner=True, set_attrs=True, **_TRUSTED)

    _replay(source, limit, checked, extract)
    # Directories last: extracting into them changed their times.
    for m in checked:
        if m.isdir():
            os.utime(os.path.join(root, m.name), (m.mtime, m.mtime))
    return info


# The archive is checked already; Python's own extraction filters (3.12+) would drop setuid bits.
_TRUSTED: dict[str, Any] = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def _remove(path: str) -> None:
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    elif os.path.isdir(path):
        for entry in os.scandir(path):
            _remove(entry.path)
        os.rmdir(path)


def _read_base_id(root: str) -> str:
    try:
        return Path(root, BASE_ID.lstrip("/")).read_text().strip()
    except FileNotFoundError:
        raise SnapError("this system has no recorded base state: record one with 'apppot-snap base'") from None


# --- the command --------------------------------------------------------------------------------


def cmd_base(ns: argparse.Namespace) -> int:
    started = time.monotonic()
    # Our own files first, so that the state recorded includes them.
    exclude = Path(ns.root, EXCLUDE_FILE.lstrip("/"))
    if not exclude.exists():
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text(DEFAULT_EXCLUDES)
    Path(ns.root, STATE_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    entries = scan(ns.root)
    manifest = write_manifest(entries, os.path.join(ns.root, BASE_MANIFEST.lstrip("/")))
    Path(ns.root, BASE_ID.lstrip("/")).write_text(manifest.id + "\n")
    took = time.monotonic() - started
    print(f"apppot-snap: base {manifest.id[:16]} recorded: {len(entries)} paths in {took:.1f} s")
    return 0


def _default_target() -> str:
    directory = JOB_DIR if os.path.isdir(JOB_DIR) else os.getcwd()
    return os.path.join(directory, DEFAULT_CHANGES_NAME.format(date=time.strftime("%Y-%m-%d")))


def cmd_changes(ns: argparse.Namespace) -> int:
    started = time.monotonic()
    base = read_manifest(os.path.join(ns.root, BASE_MANIFEST.lstrip("/")))
    now = scan(ns.root, known=None if ns.checksum else base.entries, known_since=base.epoch)
    changes = diff(base.entries, now)
    if ns.dry_run:
        for label, entries in (("add", changes.added), ("modify", changes.modified), ("attributes", changes.meta)):
            for e in entries:
                print(f"{label} {e.path}")
        for path in changes.deleted:
            print(f"delete {path}")
        return 0
    target = ns.file or _default_target()
    if os.path.exists(target) and not ns.overwrite:
        raise SnapError(f"{target} exists; give another FILE or pass --overwrite")
    info = write_changes(changes, base.id, target, ns.root, ns.verbose)
    took = time.monotonic() - started
    size = os.path.getsize(target)
    print(
        f"apppot-snap: {target}: {len(info.added)} added, {len(info.modified)} changed, {len(info.deleted)} deleted "
        f"against base {base.id[:16]}; {size} bytes in {took:.1f} s"
    )
    return 0


def cmd_manifest(ns: argparse.Namespace) -> int:
    manifest = write_manifest(scan(ns.root), ns.file)
    print(f"apppot-snap: {ns.file}: {len(manifest.entries)} paths, id {manifest.id[:16]}")
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    info = merge(ns.file, ns.root, ns.force)
    print(f"apppot-snap: merged {ns.file}: {len(info.added)} added, {len(info.modified)} changed, {len(info.deleted)} deleted")
    return 0


class _ClosedStdout(io.TextIOBase):
    """sys.stdout for a stdout closed at start: printing fails as natively, with EBADF."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(9, os.strerror(9), "stdout (closed when apppot-snap started)")


def _fill_closed_std_fds() -> None:
    """/dev/null on a closed 0, 1 or 2, so that no file opened later takes its number. (apppot.hostfds
    does this for apppot; this module carries its own, being stdlib-only in images.)"""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 1:
                sys.stdout = _ClosedStdout()
            elif fd == 2:
                sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as apppot's own (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="apppot-snap", description="A system's base state, its changes, and merging them.")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)  # for building images and for tests
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("base", help="record the whole system's state as its base")
    changes = sub.add_parser("changes", help="pack everything that differs from the base")
    changes.add_argument("file", nargs="?", help=f"the archive (default: {JOB_DIR}/{DEFAULT_CHANGES_NAME})")
    changes.add_argument("-n", "--dry-run", action="store_true", help="list what would be packed")
    changes.add_argument("-v", "--verbose", action="store_true", help="list paths as they are packed")
    changes.add_argument("--checksum", action="store_true", help="hash every file, not only those whose size or time changed")
    changes.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    manifest_p = sub.add_parser("manifest", help="write the system's current state to FILE (to compare systems)")
    manifest_p.add_argument("file")
    merge_p = sub.add_parser("merge", help="apply a changes archive to this system")
    merge_p.add_argument("file")
    merge_p.add_argument("--force", action="store_true", help="merge even onto another base")
    ns = p.parse_args(argv)
    try:
        commands = {"base": cmd_base, "changes": cmd_changes, "merge": cmd_merge, "manifest": cmd_manifest}
        return commands[ns.action](ns)
    except SnapError as e:
        print(f"apppot-snap: error: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"apppot-snap: error: {e.filename}: {e.strerror} (run it as root: sudo apppot-snap ...)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"apppot-snap: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    _fill_closed_std_fds()
    sys.exit(main())

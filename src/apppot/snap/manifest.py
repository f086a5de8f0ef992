"""A system's state: every path with its type, mode, owner, size, time, content and xattrs."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import stat
import time
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from . import agent, xattrs
from .paths import DIR, FILE, LINK, OTHER, VERSION, SnapError, is_excluded, read_excludes


class Entry(NamedTuple):
    path: str  # absolute, in the system
    kind: str  # FILE, DIR, LINK, OTHER
    mode: int  # permission bits, with setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    mtime: int  # seconds
    content: str  # sha256 of a file, target of a link, "" otherwise
    xattrs: xattrs.Xattrs = ()  # the carried ones (apppot.snap.xattrs), sorted; manifests of version 1 have none

    def same_content(self, other: Entry) -> bool:
        return self.kind == other.kind and self.content == other.content

    def same_meta(self, other: Entry) -> bool:
        return (self.mode, self.uid, self.gid, self.xattrs) == (other.mode, other.uid, other.gid, other.xattrs)


class Manifest(NamedTuple):
    id: str
    created: str
    entries: dict[str, Entry]
    epoch: int = 0  # when it was recorded


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry(path: str, real: str, st: os.stat_result, known: dict[str, Entry] | None, racy: int, lines: dict[str, bytes]) -> Entry:
    mode = stat.S_IMODE(st.st_mode)
    mtime = int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        carried = xattrs.read(real)
        if path in agent.AGENT_FILES:  # their times are the agent's, their content without its lines
            line = lines.get(path)
            data = agent.pristine(real, line) if line else None
            if data is not None:
                return Entry(path, FILE, mode, st.st_uid, st.st_gid, len(data), 0, hashlib.sha256(data).hexdigest(), carried)
            mtime = 0
        old = known.get(path) if known else None
        # Unchanged size and mtime: the content is taken as unchanged (as rsync does); --checksum hashes
        # all. Times are whole seconds (mkfs.ext4 -d keeps no more), so a file whose time is not before
        # the base was recorded may have changed within that second: it is hashed.
        if old is not None and old.kind == FILE and (old.size, old.mtime) == (st.st_size, mtime) and 0 < mtime < racy:
            content = old.content
        else:
            content = _digest(real)
        return Entry(path, FILE, mode, st.st_uid, st.st_gid, st.st_size, mtime, content, carried)
    if stat.S_ISDIR(st.st_mode):
        uid, gid = (0, 0) if path == agent.AGENT_HOME else (st.st_uid, st.st_gid)  # the agent's, every boot
        return Entry(path, DIR, mode, uid, gid, 0, 0, "", xattrs.read(real))
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
    lines = agent.agent_lines(root)
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
            entries[path] = _entry(path, child.path, st, known, known_since, lines)
            if stat.S_ISDIR(st.st_mode):
                todo.append(path)
    return entries


def _lines(entries: dict[str, Entry]) -> Iterator[str]:
    for path in sorted(entries):
        yield json.dumps(list(entries[path]), ensure_ascii=True)


def state_id(entries: dict[str, Entry]) -> str:
    """What a base is, independent of when its files were last touched: the same system recorded at
    another boot, or in a copy, has the same id."""
    h = hashlib.sha256()
    for path in sorted(entries):
        e = entries[path]
        h.update(json.dumps([e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.content, e.xattrs]).encode() + b"\n")
    return h.hexdigest()


def write_manifest(entries: dict[str, Entry], target: str, *, epoch: int | None = None) -> Manifest:
    """Write a manifest (gzip, a JSON header line, then one JSON array per path); returns it with its id.

    epoch: when it counts as recorded (default: now); an image build gives its fixed time, so that the
    manifest's bytes (gzip's header time too) are the same in every build."""
    lines = list(_lines(entries))
    ident = state_id(entries)
    epoch = int(time.time()) if epoch is None else epoch
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    header = json.dumps({"apppot_snap": VERSION, "id": ident, "created": created, "epoch": epoch, "entries": len(lines)})
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=raw, mtime=epoch) as packed:
        packed.write((header + "\n").encode())
        for line in lines:
            packed.write((line + "\n").encode())
    os.replace(tmp, target)
    return Manifest(ident, created, entries, epoch)


def _parse_entry(fields: list[object]) -> Entry:
    if len(fields) == 9:  # version 2: xattrs as [[name, hex], ...]
        found = fields[8]
        if not isinstance(found, list):
            raise TypeError("xattrs are not a list")
        fields = [*fields[:8], tuple((str(n), str(v)) for n, v in found)]
    return Entry(*fields)  # type: ignore[arg-type]


def read_manifest(source: str) -> Manifest:
    try:
        with gzip.open(source, "rt") as f:
            header = json.loads(f.readline())
            entries = {}
            for line in f:
                entry = _parse_entry(json.loads(line))
                entries[entry.path] = entry
    except FileNotFoundError:
        raise SnapError(f"no base state at {source}: record one with 'apppot-snap base'") from None
    except (OSError, ValueError, TypeError, EOFError, zlib.error, RecursionError) as e:
        raise SnapError(f"the base state {source} is damaged ({e}); record it again with 'apppot-snap base'") from e
    return Manifest(str(header.get("id")), str(header.get("created")), entries, int(header.get("epoch", 0)))

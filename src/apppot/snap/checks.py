"""What an archive must satisfy before anything of it is written: its manifest and every member."""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from typing import NamedTuple

from . import xattrs
from .paths import ALWAYS_EXCLUDED, MANIFEST_MEMBER, SnapError

MAX_MANIFEST_LISTS = 64  # brackets in the manifest: it is one object of flat lists, so json never nests deep
MAX_PATH = 4096  # Linux's PATH_MAX: no longer name can be made or opened
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_BASE_ID = re.compile("[0-9a-f]{64}")  # a sha256 hexdigest (apppot.snap.manifest)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


class ArchiveInfo(NamedTuple):
    """An archive's manifest, and the sha256 of the archive's bytes as they were read and checked."""

    base: str
    created: str
    tool: str
    deleted: list[str]
    added: list[str]
    modified: list[str]
    sha256: str | None = None  # not in the manifest: measured by whoever read the archive (apppot.snap.archive)


MANIFEST_FIELDS = ArchiveInfo._fields[:-1]


def checked_sparse(m: tarfile.TarInfo) -> bool:
    """Whether m's sparse map was read and checked by apppot-snap's own reader (apppot.snap.archive)."""
    return getattr(m, "apppot_sparse", None) is not None


def _clean_relative(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and not _CONTROL.search(name) and name not in (".", "./")


def parse_manifest(source: str, data: bytes) -> ArchiveInfo:
    lists = _JSON_STRING.sub(b"", data)
    if lists.count(b"[") + lists.count(b"{") > MAX_MANIFEST_LISTS:
        raise SnapError(f"{source}: {MANIFEST_MEMBER} is malformed (nested or too many lists); make the archive again")
    try:
        doc = json.loads(data)
        if doc.get("format") != "apppot-changes":
            raise ValueError("format is not apppot-changes")
        info = ArchiveInfo(**{k: doc[k] for k in MANIFEST_FIELDS})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SnapError(f"{source}: {MANIFEST_MEMBER} is malformed ({e}); make the archive again") from None
    texts: tuple[object, ...] = (info.base, info.created, info.tool)
    listed: tuple[object, ...] = (info.deleted, info.added, info.modified)
    if not all(isinstance(v, str) for v in texts) or not all(isinstance(v, list) for v in listed):
        raise SnapError(f"{source}: {MANIFEST_MEMBER} is malformed (wrong types); make the archive again")
    if not all(isinstance(p, str) for p in [*info.deleted, *info.added, *info.modified]):
        raise SnapError(f"{source}: {MANIFEST_MEMBER} is malformed (paths must be strings); make the archive again")
    if not _BASE_ID.fullmatch(info.base):
        raise SnapError(f"{source}: {MANIFEST_MEMBER}'s 'base' is not 64 lowercase hex digits ({info.base[:80]!r}): refused")
    for field in ("created", "tool"):  # shown by `apppot changes show`: no forged lines or terminal escapes
        if not getattr(info, field).isprintable():  # C0 and C1 controls, format characters (bidi overrides)
            raise SnapError(f"{source}: {MANIFEST_MEMBER}'s {field!r} has a newline or other control character: refused")
    return info


def check_member(source: str, m: tarfile.TarInfo) -> None:
    """What one member's header alone must satisfy: checked before its data is read."""
    what = f"{source}: member {m.name!r}"
    if _CONTROL.search(m.name):
        raise SnapError(f"{what} has a newline or other control character in its name: refused")
    if max(len(m.name.encode("utf-8", "surrogateescape")), len(m.linkname.encode("utf-8", "surrogateescape"))) > MAX_PATH:
        raise SnapError(f"{source}: member {m.name[:80]!r}... has a name or link target longer than {MAX_PATH} bytes: refused")
    if m.issym() and _CONTROL.search(m.linkname):
        raise SnapError(f"{what} is a link whose target has a newline or other control character: refused")
    if (m.sparse is not None or any(key.startswith("GNU.sparse.") for key in m.pax_headers)) and not checked_sparse(m):
        raise SnapError(f"{what} is a sparse file of a format apppot-snap does not read (only PAX 1.0): refused")
    if m.sparse is not None and not m.isreg():
        raise SnapError(f"{what} has a sparse map but is no file: refused")
    xattrs.check(what, m.pax_headers)
    if not (0 <= m.uid < 0xFFFFFFFF and 0 <= m.gid < 0xFFFFFFFF):
        raise SnapError(f"{what} has an owner out of range ({m.uid}:{m.gid}): refused")
    if not abs(m.mtime) < 8**11:  # a pax mtime may be any float: nan, inf
        raise SnapError(f"{what} has a time out of range ({m.mtime}): refused")


def check_members(source: str, info: ArchiveInfo, members: list[tarfile.TarInfo]) -> None:
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
        raise SnapError(f"{source}: its manifest does not list exactly its members (e.g. {', '.join(map(repr, extra))}): refused")


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

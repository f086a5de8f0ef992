"""What turns a base into the system as it is now."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

from .manifest import Entry
from .paths import LINK, is_excluded


class Changes(NamedTuple):
    added: list[Entry]
    modified: list[Entry]  # content or type changed
    meta: list[Entry]  # only mode, owner, xattrs or time changed
    deleted: list[str]  # top-most deleted paths; also paths whose type changed (removed, then packed)

    def packed(self) -> list[Entry]:
        return sorted([*self.added, *self.modified, *self.meta], key=lambda e: e.path)


def diff(base: dict[str, Entry], now: dict[str, Entry], excludes: Iterable[str] = (), root: str | None = None) -> Changes:
    """What turns the base into now.

    A base path missing from now is a deletion only if it is really gone: not if it is excluded
    now (snap.exclude grew after the base was recorded), nor, given root, if it still exists there
    (under a mount point, a socket): merging must never destroy what the user still has."""
    excludes = list(excludes)
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
    for path in base:
        if path in now or is_excluded(path, excludes):
            continue
        if root is not None and os.path.lexists(os.path.join(root, path.lstrip("/"))):
            continue
        gone.append(path)
    return Changes(added, modified, meta, topmost(gone))


def topmost(paths: Iterable[str]) -> list[str]:
    """The paths without those inside another of them, deepest first."""
    unique = set(paths)

    def inside_another(path: str) -> bool:
        parts = path.split("/")
        return any("/".join(parts[:i]) in unique for i in range(2, len(parts)))

    return sorted((p for p in unique if not inside_another(p)), key=lambda p: (-p.count("/"), p))

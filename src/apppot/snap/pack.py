"""Writing a changes archive: the manifest first, then every new and changed path."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tarfile
import time

from . import agent, sparse, xattrs
from .archive import ArchiveInfo
from .checks import MANIFEST_FIELDS
from .diff import Changes
from .manifest import Entry
from .paths import MANIFEST_MEMBER, OTHER, VERSION, SnapError


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
    lines = agent.agent_lines(root)
    with tarfile.open(tmp, "x:gz", format=tarfile.PAX_FORMAT) as tar:
        data = json.dumps({"format": "apppot-changes", **{k: getattr(info, k) for k in MANIFEST_FIELDS}}, indent=1).encode()
        member = tarfile.TarInfo(MANIFEST_MEMBER)
        member.size, member.mtime, member.mode = len(data), int(time.time()), 0o644
        tar.addfile(member, io.BytesIO(data))
        for entry in changes.packed():
            if verbose:
                print(entry.path)
            _add(tar, entry, os.path.join(root, entry.path.lstrip("/")), lines)


def _add(tar: tarfile.TarFile, entry: Entry, real: str, lines: dict[str, bytes]) -> None:
    name = entry.path.lstrip("/")
    member = tar.gettarinfo(real, arcname=name)
    member.uname = member.gname = ""  # numeric owners: names may differ until /etc/passwd is merged
    member.pax_headers = xattrs.to_pax(entry.xattrs)
    if member.type == tarfile.LNKTYPE:  # a hard link to a file packed before: store it whole
        member.type, member.linkname, member.size = tarfile.REGTYPE, "", os.lstat(real).st_size
    if not member.isreg():
        tar.addfile(member)
        return
    line = lines.get(entry.path)
    pristine = agent.pristine(real, line) if line else None
    if pristine is not None:  # without the agent's own account
        member.size = len(pristine)
        tar.addfile(member, io.BytesIO(pristine))
        return
    with open(real, "rb") as f:
        st = os.fstat(f.fileno())
        segments = sparse.data_segments(f.fileno(), st.st_size, st.st_blocks)
        if segments is None:
            tar.addfile(member, f)
            return
        fd = f.fileno()
        source = sparse.SparseSource(segments, lambda offset, n: os.pread(fd, min(n, 1 << 20), offset))
        member.pax_headers = {**sparse.pax_records(name, st.st_size), **member.pax_headers}
        member.size = source.size
        tar.addfile(member, source)

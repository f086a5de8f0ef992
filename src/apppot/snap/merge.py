"""Applying a checked archive: to this system (apppot-snap merge), or as the host's checked copy
that the agent's tar extracts at boot (repack)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

from . import xattrs
from .archive import ArchiveInfo, _replay, _scan, fresh_header, max_size, sparse_data
from .paths import BASE_ID, SnapError


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
        if m.sparse is not None:
            out.addfile(fresh_header(m), sparse_data(tar, m))
        else:
            out.addfile(fresh_header(m), tar.extractfile(m) if m.isreg() else None)

    try:
        with copy, tarfile.open(fileobj=copy, mode="w", format=tarfile.PAX_FORMAT) as out:
            _replay(source, limit, checked, write, info.sha256)
    except BaseException as e:
        os.unlink(target)
        if isinstance(e, OSError):
            raise SnapError(f"cannot write {target}: {e.strerror or e}") from None
        raise
    return info


def merge(source: str, root: str = "/", force: bool = False, base_id: str | None = None) -> ArchiveInfo:
    """Apply a checked archive: deletions first, then the members with their modes and owners."""
    limit = max_size()
    info, checked = _scan(source, limit)
    if base_id is None:
        base_id = _read_base_id(root)
    if info.base != base_id and not force:
        raise SnapError(
            f"{source} was made against base {info.base[:16]}, this system is base {base_id[:16]} (a base recorded "
            "again, e.g. in a COW, is another base): merge it onto the system it was made in, or pass --force"
        )
    for path in info.deleted:
        _remove(os.path.join(root, path.lstrip("/")))

    def extract(tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        target = os.path.join(root, m.name)
        if (os.path.lexists(target) and not os.path.isdir(target)) or (os.path.isdir(target) and not m.isdir()):
            _remove(target)
        tar.extract(m, root, numeric_owner=True, set_attrs=True, **_TRUSTED)
        if not m.issym():  # after the owner: chown clears file capabilities
            xattrs.apply(target, xattrs.from_pax(m.pax_headers))

    _replay(source, limit, checked, extract, info.sha256)
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

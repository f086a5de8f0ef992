"""Extended attributes apppot-snap records, compares, carries and restores.

Carried: user.* (data the owner attached) and security.capability (file capabilities, which an
archive may give as it may already give a setuid-root file). Never: trusted.* (root-only, read by
the kernel and overlayfs: trusted.overlay.* would redirect a later overlay mount), the other
security.* (SELinux labels, IMA/EVM signatures: policy of the host that made them, not the
user's change) and system.* (ACLs, which tar carries otherwise). An archive that names any of
them is refused whole."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Mapping

from .paths import SnapError

PAX_PREFIX = "SCHILY.xattr."  # as GNU tar and star write them
CAPABILITY = "security.capability"
MAX_VALUE = 64 << 10  # the kernel's XATTR_SIZE_MAX
MAX_NAME = 255
MAX_PER_FILE = 128
# What a system without xattrs says: nothing to record.
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.EACCES)

Xattrs = tuple[tuple[str, str], ...]  # (name, value as hex), sorted by name


def carried(name: str) -> bool:
    return (name.startswith("user.") and len(name) > len("user.")) or name == CAPABILITY


def read(real: str) -> Xattrs:
    """The carried xattrs of a file or directory (never a link's)."""
    try:
        names = os.listxattr(real, follow_symlinks=False)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return ()
        raise
    found = []
    for name in sorted(n for n in names if carried(n)):
        try:
            found.append((name, os.getxattr(real, name, follow_symlinks=False).hex()))
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
    return tuple(found)


def to_pax(xattrs: Xattrs) -> dict[str, str]:
    return {PAX_PREFIX + name: bytes.fromhex(value).decode("utf-8", "surrogateescape") for name, value in xattrs}


def from_pax(pax: Mapping[str, str]) -> list[tuple[str, bytes]]:
    """The xattrs of a member's pax records, as bytes (tarfile decodes binary values with surrogateescape)."""
    return [
        (key[len(PAX_PREFIX) :], value.encode("utf-8", "surrogateescape"))
        for key, value in sorted(pax.items())
        if key.startswith(PAX_PREFIX)
    ]


def check(what: str, pax: Mapping[str, str]) -> None:
    """Refuse xattrs apppot-snap never restores, and values no kernel would take."""
    found = from_pax(pax)
    if len(found) > MAX_PER_FILE:
        raise SnapError(f"{what} has more than {MAX_PER_FILE} xattrs: refused")
    for name, value in found:
        if not carried(name) or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME or "\x00" in name:
            raise SnapError(f"{what} has xattr {name!r}; apppot-snap restores only user.* and {CAPABILITY}: refused")
        if len(value) > MAX_VALUE:
            raise SnapError(f"{what} has an xattr {name!r} of more than {MAX_VALUE} bytes: refused")
        if name == CAPABILITY and not _valid_capability(value):
            raise SnapError(f"{what} has a malformed {CAPABILITY} (not a v2 or v3 capability set): refused")


def _valid_capability(value: bytes) -> bool:
    if len(value) not in (20, 24):
        return False
    (magic,) = struct.unpack_from("<I", value)
    version = magic & 0xFF000000
    return (version, len(value)) in ((0x02000000, 20), (0x03000000, 24)) and not magic & 0x00FFFFFE


def apply(path: str, wanted: list[tuple[str, bytes]]) -> None:
    """Give a merged file or directory exactly the carried xattrs of its member (after its owner was
    set: chown clears security.capability)."""
    have = {name for name, _ in read(path)}
    for name in have - {name for name, _ in wanted}:
        os.removexattr(path, name, follow_symlinks=False)
    for name, value in wanted:
        os.setxattr(path, name, value, follow_symlinks=False)

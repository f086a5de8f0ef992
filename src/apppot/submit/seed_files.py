"""Which of a job directory's files a cloud seed carries: not disks, seeds, or AppPot's own files.

Following the README in one directory, `apppot image export` leaves the disk there and
`apppot cloud-seed` its seed: packing what was there made a 601 MB seed holding the exported disk,
and the next seed held the earlier one (issue 16). A job's files never need them in the guest, which
boots from that disk. So a regular file is left out when its header says it is a disk image (qcow2,
VMDK, VDI, VHD/VHDX, an ext2/3/4 file system, a disk with an MBR), an ISO 9660 image (a seed) or a
UML COW file, or when its name ends in a suffix only such files have; the command names each one.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

from apppot.cow import COW_MAGIC

HEADER_BYTES = 0x8006  # up to ISO 9660's "CD001" at 0x8001, the farthest signature looked at
TEMP_PREFIX = ".apppot-seed-"  # the directory cloud-seed writes in before the rename (left by one that was killed)

_SUFFIXES = {
    ".qcow2": "a qcow2 disk image",
    ".qcow": "a qcow disk image",
    ".vmdk": "a VMDK disk image",
    ".vdi": "a VDI disk image",
    ".vhd": "a VHD disk image",
    ".vhdx": "a VHDX disk image",
    ".iso": "an ISO 9660 image such as a seed",
    ".cow": "a copy-on-write file",
}
_EXT_SUPERBLOCK = 1024
_EXT_MAGIC = b"\x53\xef"  # 0xEF53, little-endian, at 0x38 in the superblock
_EXT_LOG_BLOCK_SIZE = struct.Struct("<I")  # at 0x18: block size is 1024 << this (at most 64 KiB)
_MBR_SIGNATURE = b"\x55\xaa"
_MBR_PARTITIONS = 446  # four 16-byte entries, each starting with a status of 0x00 or 0x80


class LeftOut(NamedTuple):
    path: Path  # relative to the job directory
    what: str
    size: int


def kind_by_header(header: bytes) -> str | None:
    """What disk-like file starts with header (its first HEADER_BYTES bytes, or all of a shorter file), or None."""
    if header.startswith(b"QFI\xfb"):
        return "a qcow2 disk image"
    if header.startswith((b"KDMV", b"# Disk DescriptorFile")):
        return "a VMDK disk image"
    if header[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "a VDI disk image"
    if header.startswith((b"conectix", b"vhdxfile")):
        return "a VHD disk image"
    if header[0x8001:0x8006] == b"CD001":
        return "an ISO 9660 image such as a seed"
    if header[:4] == struct.pack(">I", COW_MAGIC):
        return "a UML copy-on-write file"
    sb = header[_EXT_SUPERBLOCK : _EXT_SUPERBLOCK + 0x3A]
    if len(sb) == 0x3A and sb[0x38:] == _EXT_MAGIC and _EXT_LOG_BLOCK_SIZE.unpack_from(sb, 0x18)[0] <= 6:
        return "an ext2/3/4 file system image"
    if header[510:512] == _MBR_SIGNATURE and all(header[_MBR_PARTITIONS + 16 * i] in (0x00, 0x80) for i in range(4)):
        return "a raw disk image with an MBR"
    return None


def kind_by_name(name: str) -> str | None:
    """What a file named name is, where only disks, seeds and COW files have that suffix."""
    return _SUFFIXES.get(Path(name).suffix.lower())


def left_out_reason(name: str, header: bytes) -> str | None:
    """Why a regular file of the job directory is not packed, or None: it is the job's."""
    return kind_by_header(header) or kind_by_name(name)

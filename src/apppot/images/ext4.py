"""Just enough of the ext2/3/4 superblock to recognise an image and name it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from apppot.errors import ImageError

_SUPERBLOCK_OFFSET = 1024
_MAGIC_OFFSET = 0x38
_UUID_OFFSET = 0x68
_EXT_MAGIC = 0xEF53


def filesystem_uuid(image: Path) -> str:
    """The UUID of an ext2/3/4 image; a clear error if the file is not one."""
    try:
        with image.open("rb") as f:
            f.seek(_SUPERBLOCK_OFFSET)
            sb = f.read(0x80)
    except FileNotFoundError:
        raise ImageError(f"image {image} does not exist; check the path, or omit --image to use the default appliance") from None
    except IsADirectoryError:
        raise ImageError(f"image {image} is a directory, not a disk image file") from None
    except OSError as e:
        raise ImageError(f"cannot read image {image}: {e.strerror}; check its permissions") from e
    if len(sb) < 0x80 or int.from_bytes(sb[_MAGIC_OFFSET : _MAGIC_OFFSET + 2], "little") != _EXT_MAGIC:
        raise ImageError(
            f"{image} is not an ext2/3/4 filesystem image; give an AppPot appliance image (apppot image build-tiny makes one)"
        )
    return str(uuid.UUID(bytes=sb[_UUID_OFFSET : _UUID_OFFSET + 16]))


def check_readable(image: Path) -> None:
    if not os.access(image, os.R_OK):
        raise ImageError(f"image {image} is not readable by you; fix its permissions (chmod a+r)")

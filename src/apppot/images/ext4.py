"""Just enough of the ext2/3/4 superblock to recognise an image and name it."""

from __future__ import annotations

from pathlib import Path

from apppot import userpath
from apppot.errors import ImageError

_SUPERBLOCK_OFFSET = 1024
_MAGIC_OFFSET = 0x38
_UUID_OFFSET = 0x68
_EXT_MAGIC = 0xEF53
_WTIME_OFFSET = 0x30
_WTIME_HI_OFFSET = 0x274
_CHECKSUM_OFFSET = 0x3FC


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def _superblock_checksum(sb: bytes | bytearray) -> int:
    """ext4's superblock checksum: crc32c seeded with ~0, without the final inversion."""
    crc = 0xFFFFFFFF
    for byte in sb[:_CHECKSUM_OFFSET]:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def format_uuid(raw: bytes) -> str:
    """16 bytes as 8-4-4-4-12 hex (what uuid.UUID prints, without importing it on the start path)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def filesystem_uuid(image: Path) -> str:
    """The UUID of an ext2/3/4 image; a clear error if the file is not one."""
    fix = "give an AppPot appliance image file (apppot image list shows those in the cache)"
    try:
        with userpath.open_for_reading(image, "image", ImageError, fix, block_device=True) as f:
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
    return format_uuid(sb[_UUID_OFFSET : _UUID_OFFSET + 16])


def pin_write_time(image: Path, epoch: int) -> None:
    """Set the superblock's last-write time (e2fsprogs tools stamp the current time)."""
    with image.open("r+b") as f:
        f.seek(_SUPERBLOCK_OFFSET)
        sb = bytearray(f.read(1024))
        old = int.from_bytes(sb[_CHECKSUM_OFFSET:], "little")
        if old != _superblock_checksum(sb):
            raise ImageError(f"{image}: superblock checksum does not verify; the image is damaged")
        sb[_WTIME_OFFSET : _WTIME_OFFSET + 4] = (epoch & 0xFFFFFFFF).to_bytes(4, "little")
        sb[_WTIME_HI_OFFSET] = (epoch >> 32) & 0xFF
        sb[_CHECKSUM_OFFSET:] = _superblock_checksum(sb).to_bytes(4, "little")
        f.seek(_SUPERBLOCK_OFFSET)
        f.write(sb)


def missing_paths(image: Path, paths: list[str]) -> list[str]:
    """Which of these absolute paths the image's filesystem lacks (read with debugfs, never mounted)."""
    from apppot.proc import run

    missing = []
    for path in paths:
        out = run(["debugfs", "-R", f'stat "{path}"', str(image)], package="e2fsprogs")
        if b"File not found" in out.stderr:
            missing.append(path)
    return missing


def read_file(image: Path, path: str) -> bytes | None:
    """A file's bytes from the image's filesystem (read with debugfs, never mounted); None if absent."""
    from apppot.proc import run

    out = run(["debugfs", "-R", f'cat "{path}"', str(image)], package="e2fsprogs")
    if b"File not found" in out.stderr:
        return None
    return out.stdout

"""`apppot image export`: an appliance as a disk any hypervisor boots by itself.

The disk has an MBR with syslinux's boot code and two partitions: a FAT boot
partition holding syslinux, Debian's kernel (apppot.guest_kernel) and AppPot's
initramfs, and the image's ext4 file system itself, copied sparsely. Booted by
firmware (no -kernel, no kernel command line from outside), the initramfs mounts
the root by its UUID and starts the agent, which takes its job from cloud
user-data (a NoCloud `cidata` volume, or an EC2-style metadata service) or says
that there is none and powers off. Built as a raw disk without root, then
converted with qemu-img.
"""

from __future__ import annotations

import os
import tempfile
import time
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError, UsageError
from apppot.images import ext4
from apppot.images.holes import data_regions
from apppot.proc import run, which
from apppot.say import Say

MIB = 1024 * 1024
BOOT_START = 1 * MIB
BOOT_SIZE = 64 * MIB
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
STEPS = 4
# program -> Debian package
TOOLS = {
    "qemu-img": "qemu-utils",
    "sfdisk": "fdisk",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "syslinux": "syslinux",
}


class DiskFormat(StrEnum):
    """Disk formats qemu-img writes, and who reads them."""

    QCOW2 = "qcow2"  # QEMU/KVM, OpenStack
    VMDK = "vmdk"  # VMware, VirtualBox
    VDI = "vdi"  # VirtualBox
    RAW = "raw"  # Xen, dd to a real disk, any cloud import

    @classmethod
    def from_name(cls, text: str) -> DiskFormat:
        try:
            return cls(text.lower())
        except ValueError:
            raise UsageError(f"unknown disk format {text!r}: use qcow2, vmdk, vdi or raw") from None

    @classmethod
    def from_suffix(cls, path: Path) -> DiskFormat | None:
        suffix = path.suffix.lower().lstrip(".")
        return cls.RAW if suffix == "img" else next((f for f in cls if f.value == suffix), None)


class Layout(NamedTuple):
    """Where the partitions lie on the disk, in bytes."""

    boot_start: int
    boot_size: int
    root_start: int
    root_size: int
    disk_size: int


def layout(image_size: int) -> Layout:
    root_start = BOOT_START + BOOT_SIZE
    root_size = -(-image_size // MIB) * MIB
    return Layout(BOOT_START, BOOT_SIZE, root_start, root_size, root_start + root_size + MIB)


def sfdisk_script(lay: Layout) -> str:
    """An MBR partition table: a bootable FAT16 partition, then Linux's."""
    s = 512
    return (
        "label: dos\n"
        f"start={lay.boot_start // s}, size={lay.boot_size // s}, type=6, bootable\n"
        f"start={lay.root_start // s}, size={lay.root_size // s}, type=83\n"
    )


def syslinux_cfg(fs_uuid: str) -> str:
    """How syslinux starts the guest: Debian's kernel, AppPot's initramfs, the root by UUID."""
    params = f"console=tty0 console=ttyS0,115200 panic=-1 quiet apppot_root=UUID={fs_uuid} apppot_modules=disk"
    return f"DEFAULT apppot\nPROMPT 0\nTIMEOUT 0\nLABEL apppot\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {params}\n"


def check_tools() -> None:
    missing = [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if which(tool) is None]
    if not SYSLINUX_MBR.is_file():
        missing.append(f"{SYSLINUX_MBR} (syslinux-common)")
    if missing:
        packages = " ".join(sorted({*TOOLS.values(), "syslinux-common"}))
        raise HostError(f"exporting needs {', '.join(missing)}: sudo apt-get install {packages}")


class Exported(NamedTuple):
    path: Path
    format: DiskFormat
    size: int  # bytes on disk
    kernel: str  # the guest kernel's release
    seconds: float


def export(image: Path, out: Path, fmt: DiskFormat, say: Say, force: bool = False) -> Exported:
    """Write image as a bootable disk in fmt to out (never over an existing file unless force)."""
    from apppot import guest_kernel

    started = time.monotonic()
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError(f"{out} exists; choose another -o or pass --force to replace it")
    if out.resolve() == image.resolve():
        raise UsageError("-o names the image itself; give another file")
    check_tools()
    fs_uuid = ext4.filesystem_uuid(image)
    from apppot.submit.cloud import image_reads_user_data

    if not image_reads_user_data(image):  # booted on its own, such an agent could never find a job
        raise UsageError(f"the agent in {image} predates cloud user-data; rebuild the image with this AppPot, then export it")
    image_size = image.stat().st_size
    if image_size % 512:
        raise UsageError(f"{image} is {image_size} bytes, not whole 512-byte sectors; is it a disk image?")
    say(f"[1/{STEPS}] guest kernel and initramfs")
    kernel = guest_kernel.find(say)
    initrd = guest_kernel.initramfs(kernel)
    lay = layout(image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".apppot-export-", dir=out.parent) as tmp:
        work = Path(tmp)
        say(f"[2/{STEPS}] boot partition: syslinux, {kernel.release}")
        boot = work / "boot.img"
        run(["mkfs.vfat", "-C", "-n", "APPPOTBOOT", str(boot), str(lay.boot_size // 1024)], package="dosfstools")
        (work / "syslinux.cfg").write_text(syslinux_cfg(fs_uuid))
        mtools_env = {"MTOOLS_SKIP_CHECK": "1"}
        for src, name in ((kernel.vmlinuz, "vmlinuz"), (initrd, "initrd.img"), (work / "syslinux.cfg", "syslinux.cfg")):
            run(["mcopy", "-i", str(boot), str(src), f"::/{name}"], env=mtools_env, package="mtools")
        run(["syslinux", "--install", str(boot)], package="syslinux")
        say(f"[3/{STEPS}] disk: partition table, boot partition, {image.name} ({image_size // MIB} MiB, sparse)")
        disk = work / "disk.raw"
        with disk.open("wb") as f:
            f.truncate(lay.disk_size)
        run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)], input=sfdisk_script(lay).encode(), package="fdisk")
        with disk.open("r+b") as f:
            f.write(SYSLINUX_MBR.read_bytes()[:440])  # boot code only: the partition table stays
        copy_sparse(boot, disk, lay.boot_start)
        copy_sparse(image, disk, lay.root_start)
        say(f"[4/{STEPS}] {fmt.value} with qemu-img")
        if fmt is DiskFormat.RAW:
            disk.replace(out)
        else:
            converted = work / f"disk.{fmt.value}"
            run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt.value, str(disk), str(converted)], package="qemu-utils")
            converted.replace(out)
    used = out.stat().st_blocks * 512
    return Exported(out, fmt, used, kernel.release, time.monotonic() - started)


def copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Copy src into dst at offset, skipping src's holes (dst is sparse where they are)."""
    with src.open("rb") as fin, dst.open("r+b") as fout:
        for start, end in data_regions(fin.fileno()):
            while start < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), end - start, start, offset + start)
                if n <= 0:
                    raise HostError(f"copying {src} into {dst} stopped at byte {start}")
                start += n

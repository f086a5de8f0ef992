"""The kernel QEMU guests and exported images boot: Debian's `linux-image-amd64`, fetched by AppPot.

`fetch` looks up the package behind Debian's `linux-image-amd64` metapackage (through
the private apt configuration of kernel_build: the system's apt sources are never
touched), downloads it once into the user's cache and keeps its kernel and the few
modules a guest needs (virtio disks, 9p, ext4, the CD, SATA and FAT drivers for
exported images, a watchdog), closed over their dependencies. The host's /boot is
never used.

`initramfs` packs those modules with busybox and AppPot's boot stage
(guest/apppot-boot) into an uncompressed newc cpio archive, built in Python: no root,
no cpio program, the same bytes for the same inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError
from apppot.hostcache import read_json, read_record, write_record
from apppot.images.store import cache_dir
from apppot.rundir import remove_tree
from apppot.say import Say

METAPACKAGE = "linux-image-amd64"
INITRAMFS_VERSION = "2"
BOOT_STAGE = Path(__file__).resolve().parent / "guest" / "apppot-boot"
UDHCPC_SCRIPT = Path(__file__).resolve().parent / "guest" / "udhcpc.script"
# Loaded by every boot, in this order after their dependencies: what QEMU's direct boot needs.
DIRECT_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "ext4",
    "crc32c_generic",
    "i6300esb",
)
# Loaded when booting from a disk (an exported image): the disks, CDs and file systems other hypervisors offer.
DISK_MODULES = (
    "ata_piix",
    "ahci",
    "ata_generic",
    "sd_mod",
    "sr_mod",
    "isofs",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
    "xen_blkfront",
    "e1000",
)
BUSYBOX_APPLETS = (
    "sh",
    "mount",
    "umount",
    "insmod",
    "findfs",
    "switch_root",
    "sleep",
    "mkdir",
    "cat",
    "watchdog",
    "ip",
    "udhcpc",
    "wget",
    "poweroff",
    "ln",
    "timeout",
    "rm",
)
_RELEASE = re.compile(r"linux-image-(\d[\w.+-]*)")


class GuestKernel(NamedTuple):
    """A fetched kernel: its directory holds vmlinuz, modules/ and kernel.json."""

    directory: Path
    package: str
    version: str  # the Debian package version
    release: str  # the kernel release, e.g. 6.1.0-41-amd64
    load_order: tuple[str, ...]  # module names, dependencies first: every module kept
    direct: tuple[str, ...]  # the part of load_order QEMU's direct boot needs

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    def module(self, name: str) -> Path:
        return self.directory / "modules" / f"{name}.ko"


def kernels_root() -> Path:
    return cache_dir() / "guest-kernel"


# --- pure helpers --------------------------------------------------------------------------------


MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko")  # newer Debian kernels ship compressed modules


def module_name(filename: str) -> str:
    """The kernel's name of a module file: no .ko (nor .ko.xz, .ko.zst), '-' read as '_'."""
    suffix = next((s for s in MODULE_SUFFIXES if filename.endswith(s)), "")
    return filename.removesuffix(suffix).replace("-", "_")


def module_depends(data: bytes) -> list[str]:
    """The modules a module (its uncompressed bytes) depends on, by their kernel names."""
    deps = modinfo(data).get("depends", [""])[0]
    return [module_name(d) for d in deps.split(",") if d]


def module_bytes(path: Path) -> bytes:
    """A module file's contents, uncompressed: busybox's insmod in the initramfs takes plain modules only."""
    if path.name.endswith(".xz"):
        import lzma

        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        from apppot.proc import run

        return run(["zstd", "-dcq", str(path)], package="zstd").stdout
    return path.read_bytes()


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The .modinfo section of a 64-bit little-endian module: key -> values."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, _type = struct.unpack_from("<II", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 24)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name : end] != b".modinfo":
            continue
        for entry in data[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def load_order(wanted: Iterable[str], depends: dict[str, list[str]], builtin: set[str]) -> list[str]:
    """The modules to load for `wanted`, each after the modules it depends on; built-in ones left out."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in builtin or name in order:
            return
        if name not in depends:
            raise HostError(f"the guest kernel has no module {name}")
        if name in visiting:
            raise HostError(f"the guest kernel's modules depend on each other in a circle at {name}")
        visiting.add(name)
        for dep in depends[name]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


class CpioEntry(NamedTuple):
    name: str
    mode: int  # with the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Iterable[CpioEntry], mtime: int = 0) -> bytes:
    """An uncompressed newc cpio archive (what the kernel unpacks as an initramfs), owned by root."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 1, mtime, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        pad()
        out.extend(entry.data)
        pad()
    return bytes(out)


def parse_depends(output: str, prefix: str = "linux-image-") -> str | None:
    """The real kernel package from `apt-cache depends linux-image-amd64`."""
    for line in output.splitlines():
        key, _, value = line.strip().partition(": ")
        if key in ("Depends", "|Depends") and value.startswith(prefix) and _RELEASE.fullmatch(value.strip()):
            return value.strip()
    return None


# --- the cache -----------------------------------------------------------------------------------


def installed() -> GuestKernel | None:
    """The fetched kernel AppPot uses (the newest fetched), or None."""
    pointer = (read_record(kernels_root() / "current") or b"").decode(errors="replace").strip()
    if not pointer or "/" in pointer or pointer in (".", ".."):
        return None
    directory = kernels_root() / pointer
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = read_json(directory / "kernel.json")
        kernel = GuestKernel(
            directory,
            record["package"],
            record["version"],
            record["release"],
            tuple(record["load_order"]),
            tuple(record["direct"]),
        )
        # A kernel kept by an AppPot that wanted other modules is fetched again.
        if stat.S_ISREG(os.lstat(kernel.vmlinuz).st_mode) and record["wanted"] == [*DIRECT_MODULES, *DISK_MODULES]:
            return kernel
    return None


def find(say: Say) -> GuestKernel:
    """The guest kernel, fetched on first use."""
    from apppot.images.store import cache_owner

    if cache_owner(kernels_root()) is not None:  # its files would steer what root reads and writes
        raise HostError(
            f"root does not use the guest kernel in another user's cache ({kernels_root()}); "
            "run as that user, or unset XDG_CACHE_HOME to use root's own cache"
        )
    return installed() or fetch(say)


def fetch(say: Say) -> GuestKernel:
    """Download Debian's current kernel package and keep what guests need of it."""
    from apppot.kernel_build import PrivateApt, own_suite

    root = kernels_root()
    root.mkdir(parents=True, exist_ok=True)
    apt = PrivateApt(root / "apt", own_suite=own_suite())
    try:
        apt.binary_sources()
        package = parse_depends(apt.query(["apt-cache", "depends", METAPACKAGE]))
        if package is None:
            raise HostError(f"{METAPACKAGE} names no kernel package")
        version = apt.query(["apt-cache", "show", "--no-all-versions", package])
        version = next((ln.split(": ", 1)[1] for ln in version.splitlines() if ln.startswith("Version: ")), "")
    except HostError as e:
        raise HostError(f"cannot look up Debian's kernel package ({e}); check the network or set APPPOT_DEBIAN_MIRROR") from None
    release = package.removeprefix("linux-image-")
    say(f"fetching Debian's kernel package {package} {version} (once, into {root})")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            unpacked = apt.fetch_package(package, version, Path(tmp))
        except HostError as e:
            raise HostError(f"downloading {package} failed ({e}); check the network or set APPPOT_DEBIAN_MIRROR") from None
        return _keep(unpacked, root, package, version, release)


def _keep(unpacked: Path, root: Path, package: str, version: str, release: str) -> GuestKernel:
    moddir = unpacked / "lib" / "modules" / release
    files = {module_name(p.name): p for p in moddir.joinpath("kernel").rglob("*.ko*") if p.name.endswith(MODULE_SUFFIXES)}
    builtin = {module_name(Path(line).name) for line in (moddir / "modules.builtin").read_text().split()}
    depends = {name: module_depends(module_bytes(path)) for name, path in files.items()}
    order = load_order([*DIRECT_MODULES, *DISK_MODULES], depends, builtin)
    direct = load_order(DIRECT_MODULES, depends, builtin)
    target = root / f"{release}_{re.sub(r'[^A-Za-z0-9.+-]', '_', version)}"
    if target.exists():
        remove_tree(str(target))
    (target / "modules").mkdir(parents=True)
    (unpacked / "boot" / f"vmlinuz-{release}").rename(target / "vmlinuz")
    for name in order:
        (target / "modules" / f"{name}.ko").write_bytes(module_bytes(files[name]))
    record = {
        "package": package,
        "version": version,
        "release": release,
        "load_order": order,
        "direct": direct,
        "wanted": [*DIRECT_MODULES, *DISK_MODULES],
    }
    write_record(target / "kernel.json", (json.dumps(record, indent=1) + "\n").encode())
    point_current(root, target.name)
    return GuestKernel(target, package, version, release, tuple(order), tuple(direct))


def point_current(root: Path, name: str) -> None:
    """Make ``name`` (a directory in ``root``) the kernel installed() finds."""
    write_record(root / "current", f"{name}\n".encode())


# --- the kernel QEMU boots directly ---------------------------------------------------------------


def direct_kernel(kernel: GuestKernel) -> Path:
    """The uncompressed kernel (vmlinux), which QEMU starts through its PVH entry point: under TCG
    this saves the three seconds the compressed kernel takes to unpack itself. Made once from
    vmlinuz; vmlinuz itself where that fails (a kernel compressed other than with xz)."""
    target = kernel.directory / "vmlinux"
    if target.is_file():
        return target
    elf = vmlinux_from_bzimage(kernel.vmlinuz.read_bytes())
    if elf is None:
        return kernel.vmlinuz
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_bytes(elf)
        tmp.replace(target)
    except OSError:  # a kernel shared read-only (a site's): the compressed one boots too, only slower
        tmp.unlink(missing_ok=True)
        return kernel.vmlinuz
    return target


def vmlinux_from_bzimage(data: bytes) -> bytes | None:
    """The ELF kernel inside an xz-compressed bzImage, or None."""
    import lzma

    start = data.find(b"\xfd7zXZ\x00")
    while start >= 0:
        with contextlib.suppress(lzma.LZMAError):
            elf = lzma.LZMADecompressor().decompress(data[start:])
            if elf[:4] == b"\x7fELF":
                return elf
        start = data.find(b"\xfd7zXZ\x00", start + 1)
    return None


# --- the initramfs -------------------------------------------------------------------------------


def initramfs(kernel: GuestKernel) -> Path:
    """The initramfs for this kernel and this AppPot's boot stage, built once (about a second)."""
    from apppot.images.tiny import BUSYBOX

    busybox = Path(BUSYBOX)
    if not busybox.is_file():
        raise HostError("busybox is not installed: sudo apt-get install busybox-static")
    stage = BOOT_STAGE.read_bytes()
    udhcpc = UDHCPC_SCRIPT.read_bytes()
    digest = hashlib.sha256()
    for part in (INITRAMFS_VERSION.encode(), stage, udhcpc, busybox.read_bytes(), kernel.release.encode()):
        digest.update(hashlib.sha256(part).digest())
    path = kernel.directory / f"initrd-{digest.hexdigest()[:16]}.cpio"
    if path.is_file():
        return path
    entries = [
        CpioEntry("dev", 0o040755),
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("proc", 0o040755),
        CpioEntry("sys", 0o040755),
        CpioEntry("newroot", 0o040755),
        CpioEntry("seed", 0o040755),
        CpioEntry("etc", 0o040755),
        CpioEntry("etc/udhcpc.script", 0o100755, udhcpc),
        CpioEntry("bin", 0o040755),
        CpioEntry("bin/busybox", 0o100755, busybox.read_bytes()),
        *(CpioEntry(f"bin/{applet}", 0o120777, b"busybox") for applet in BUSYBOX_APPLETS),
        CpioEntry("init", 0o100755, stage),
        CpioEntry("lib", 0o040755),
        CpioEntry("lib/modules", 0o040755),
        CpioEntry("lib/modules/load.direct", 0o100644, "".join(f"{m}\n" for m in kernel.direct).encode()),
        CpioEntry("lib/modules/load.disk", 0o100644, "".join(f"{m}\n" for m in kernel.load_order).encode()),
        *(CpioEntry(f"lib/modules/{m}.ko", 0o100644, kernel.module(m).read_bytes()) for m in kernel.load_order),
    ]
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(cpio_newc(entries))
    tmp.replace(path)
    return path

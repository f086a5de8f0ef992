"""The QEMU command line for one job, and for booting an exported disk (pure: no I/O).

The guest is the same image and agent as under UML. The differences are all here:
the kernel is Debian's (apppot.guest_kernel) with AppPot's initramfs, the disk is
virtio with ``snapshot=on`` (the base is never written), the control and job
directories are 9p shares, and the job's stdout, stderr and console are three
serial lines bound to host file descriptors (ttyS0, ttyS1, ttyS2; an interactive
terminal is ttyS3). QEMU's own exit status says nothing about the job: the agent
reports it in the control directory, as under UML.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from apppot.backends.uml import AGENT_PATH, SYSTEMD_PATH

MIB = 1024 * 1024
CTL_TAG = "apppot_ctl"
OUT_TAG = "apppot_out"
JOB_TAG = "apppot_job"
CONSOLE = "ttyS2"
TERMINAL = "ttyS3"
# QEMU's binaries and the Debian packages that hold them.
QEMU_SYSTEM = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
QEMU_IMG = "qemu-img"
QEMU_IMG_PACKAGE = "qemu-utils"


class Accel(StrEnum):
    """How QEMU runs the guest's instructions."""

    KVM = "kvm"  # the host CPU, through /dev/kvm: near native speed
    TCG = "tcg"  # emulation: works everywhere, several times slower

    def cpu(self) -> str:
        return "host" if self is Accel.KVM else "max"


class DiskBus(StrEnum):
    """How a disk is attached: what the guest's drivers must know."""

    VIRTIO = "virtio"  # QEMU/KVM, clouds
    IDE = "ide"  # the emulated disk of Xen HVM and older hypervisors (ata_piix)
    AHCI = "ahci"  # SATA: VirtualBox's and VMware's default controller


class QemuLaunch(NamedTuple):
    """Everything a QEMU job's command line is made of."""

    qemu: str
    kernel: str
    initrd: str
    image: str
    accel: Accel
    mem_bytes: int
    ctl_dir: str
    out_dir: str
    job_dir: str
    log_fd: int
    stdout_fd: int
    stderr_fd: int
    terminal: bool = False  # an interactive session on QEMU's own stdin and stdout (ttyS3 in the guest)
    name: str = ""  # the instance name (--id), shown in QEMU's command line
    overlay: str | None = None  # a qcow2 file over the image that keeps the job's writes (--cow)
    writable: bool = False  # --writable-image: the job writes the image itself
    netdev: str | None = None  # the NIC's back end (e.g. vde,id=net0,sock=...); None: no network
    extra: tuple[str, ...] = ()  # more kernel parameters
    stdout_port: bool = True  # stdout over a virtio port; False: over a serial line (the host's stdout is a terminal)
    stderr_port: bool = True
    full_boot: bool = False


def _serial(name: str, path: str, append: bool = False) -> list[str]:
    # append=on: QEMU's own stderr goes to the console log too, and a truncating open would erase it.
    return ["-chardev", f"file,id={name},path={path}{',append=on' if append else ''}", "-serial", f"chardev:{name}"]


def _machine(qemu: str, accel: Accel, mem_bytes: int) -> list[str]:
    return [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        f"pc,accel={accel.value}",
        "-cpu",
        accel.cpu(),
        "-smp",
        "1",
        "-m",
        f"{mem_bytes // MIB}M",
        "-no-reboot",
        # A guest that stops being scheduled stops feeding the watchdog the boot stage armed.
        "-device",
        "i6300esb",
        "-action",
        "watchdog=poweroff",
    ]


def qemu_argv(launch: QemuLaunch, guest_params: list[str]) -> list[str]:
    """QEMU's argv: machine, disk, shares, serial lines, then the kernel and its parameters."""
    if launch.overlay is not None:  # kept: written back as the guest flushes, unlike the throw-away snapshot
        drive = f"file={launch.overlay},format=qcow2,if=virtio"
    elif launch.writable:
        drive = f"file={launch.image},format=raw,if=virtio"
    else:
        drive = f"file={launch.image},format=raw,if=virtio,snapshot=on,cache=unsafe"
    # A full host filesystem is an I/O error the guest sees (and logs), not a paused VM that never ends.
    drive += ",werror=report,rerror=report"
    argv = _machine(launch.qemu, launch.accel, launch.mem_bytes)
    if launch.name:
        argv += ["-name", launch.name]
    argv += ["-drive", drive]
    # The control directory is read-only to the guest: QEMU refuses its writes, whatever root inside does.
    shares = ((CTL_TAG, launch.ctl_dir, ",readonly=on"), (OUT_TAG, launch.out_dir, ""), (JOB_TAG, launch.job_dir, ""))
    for tag, path, mode in shares:
        argv += [
            "-fsdev",
            f"local,id={tag},path={path},security_model=none{mode}",
            "-device",
            f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
        ]
    # A stream that is a pipe or file on the host goes over a virtio port (tens of MB/s), one that is a
    # terminal over a serial line (a terminal in the guest too, about 1 MB/s): ttyS0 and ttyS1 keep
    # their names either way.
    ports: list[str] = []
    for name, fd, fast in (("out", launch.stdout_fd, launch.stdout_port), ("err", launch.stderr_fd, launch.stderr_port)):
        if fast:
            argv += ["-serial", "null"]
            ports += ["-chardev", f"file,id={name},path=/dev/fd/{fd}"]
            ports += ["-device", f"virtserialport,chardev={name},name=apppot.std{name}"]
        else:
            argv += _serial(name, f"/dev/fd/{fd}")
    argv += _serial("log", f"/dev/fd/{launch.log_fd}", append=True)
    if ports:
        argv += ["-device", "virtio-serial-pci", *ports]
    tty_params: list[str] = []
    if launch.terminal:
        # QEMU puts the terminal in raw mode (and back); Ctrl-C goes to the guest, as under UML.
        argv += ["-chardev", "stdio,id=term,signal=off", "-serial", "chardev:term"]
        tty_params = [f"apppot_tty={TERMINAL}"]
    if launch.netdev is not None:
        argv += ["-netdev", launch.netdev, "-device", "virtio-net-pci,netdev=net0"]
    params = [
        f"console={CONSOLE}",
        "quiet",
        "panic=-1",
        "apppot_root=/dev/vda",
        "apppot_modules=direct",
        *([f"apppot_init={SYSTEMD_PATH}"] if launch.full_boot else []),
        *tty_params,
        *launch.extra,
        *guest_params,
    ]
    argv += ["-kernel", launch.kernel, "-initrd", launch.initrd, "-append", " ".join(params)]
    return argv


def firmware_boot_argv(
    qemu: str,
    disk: str,
    accel: Accel,
    mem_bytes: int,
    console: str,
    seed: str | None = None,
    disk_format: str = "qcow2",
    netdev: str = "user,id=net0",
    bus: DiskBus = DiskBus.VIRTIO,
    snapshot: bool = True,
) -> list[str]:
    """QEMU booting a disk by its firmware, as a hypervisor that knows nothing of AppPot would:
    no -kernel, no -append. The disk sits on ``bus`` (written only without ``snapshot``); the
    console (ttyS0) goes to the file `console`; ``netdev`` is the NIC's back end (an id of net0)."""
    argv = _machine(qemu, accel, mem_bytes)
    drive = f"file={disk},format={disk_format}" + (",snapshot=on" if snapshot else "")
    if bus is DiskBus.AHCI:
        argv += ["-device", "ahci,id=sata", "-drive", f"{drive},if=none,id=disk0", "-device", "ide-hd,drive=disk0,bus=sata.0"]
    else:
        argv += ["-drive", f"{drive},if={bus.value}"]
    if seed is not None:
        argv += ["-drive", f"file={seed},format=raw,media=cdrom,readonly=on"]
    argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"]
    argv += _serial("console", console)
    return argv


__all__ = ["AGENT_PATH", "Accel", "DiskBus", "QemuLaunch", "firmware_boot_argv", "qemu_argv"]

"""A job's guest under QEMU: Debian's kernel with AppPot's initramfs, KVM or TCG, a snapshot or overlay.

QEMU runs in a network namespace of its own (bubblewrap), where the NAT helper's switch is
its only way out. The guest's disk writes go to QEMU's throw-away snapshot, or to a qcow2
overlay the user keeps (--cow), which is checked against the image before each use.
"""

from __future__ import annotations

import os
from pathlib import Path

from apppot import cow, cpu, diskspace
from apppot.backends.base import GuestDisk, GuestFds, GuestNetwork, Instance, Prepared, RunPaths
from apppot.backends.choice import Decision
from apppot.backends.qemu import (
    CTL_TAG,
    JOB_TAG,
    OUT_TAG,
    QEMU_IMG,
    QEMU_IMG_PACKAGE,
    QEMU_PACKAGE,
    QEMU_SYSTEM,
    Accel,
    QemuLaunch,
    qemu_argv,
)
from apppot.errors import CowError, HostError, UsageError
from apppot.network import choose_qemu_network
from apppot.proc import run, which
from apppot.protocol import StreamMode, render_kernel_params
from apppot.sandbox import find_bwrap, netns_argv, probe, require_netns_or_warn
from apppot.say import Say
from apppot.spec import DEFAULT_MEM, JobSpec
from apppot.streams import Streams


class QemuInstance(Instance):
    name = "QEMU"

    def __init__(
        self, spec: JobSpec, prepared: Prepared, qemu: str, kernel: Path, initrd: Path, accel: Accel, bwrap: str | None
    ) -> None:
        super().__init__(spec, prepared)
        self.qemu = qemu
        self.kernel = kernel  # what QEMU boots directly (guest_kernel.direct_kernel)
        self.initrd = initrd
        self.accel = accel
        self.bwrap = bwrap  # None: QEMU shares the host's network namespace (with a warning)

    @classmethod
    def prepare(cls, spec: JobSpec, say: Say, common: Prepared, decision: Decision) -> QemuInstance:
        """QEMU, the guest kernel, the accelerator, memory, network and namespace; ``common`` has the rest."""
        from apppot import guest_kernel

        assert decision.accel is not None
        qemu = which(QEMU_SYSTEM)
        if qemu is None:
            raise HostError(f"{QEMU_SYSTEM} is not installed: sudo apt-get install {QEMU_PACKAGE}")
        kernel = guest_kernel.find(say)
        for path, what in ((common.jobdir, "job directory"), (common.image, "image")):
            if "," in str(path):
                raise UsageError(f"the {what} path {path} has a comma, which QEMU cannot take; rename or move it")
        # QEMU's emulation runs on several host threads: it is pinned only when asked for a CPU.
        pin = None
        if spec.cpu not in (None, "auto"):
            pin = cpu.choose_cpu(spec.cpu, os.sched_getaffinity(0), cpu.current_cpu())
        bwrap = find_bwrap()
        netns_warning = require_netns_or_warn(spec.isolation, probe(bwrap))
        prepared = common._replace(
            mem_bytes=spec.mem_bytes or DEFAULT_MEM,
            net=choose_qemu_network(spec.net, spec.host_loopback),
            cpu=pin,
            notices=common.notices + tuple(w for w in (decision.warning, netns_warning) if w),
        )
        if spec.cow is not None and spec.cow.exists():
            check_overlay(spec.cow, common.image)
        direct, initrd = guest_kernel.direct_kernel(kernel), guest_kernel.initramfs(kernel)
        return cls(spec, prepared, qemu, direct, initrd, decision.accel, None if netns_warning else bwrap)

    def disk(self, rundir: Path) -> GuestDisk:
        """The image itself (QEMU's temporary snapshot keeps the job's writes, or --writable-image), or the
        --cow overlay."""
        spec, p = self.spec, self.prepared
        image = p.image.resolve()
        if spec.writable_image:
            return GuestDisk(image, diskspace.watch(image, p.image, rundir, kept=True))
        if spec.cow is None:  # the snapshot goes where QEMU's TMPDIR (the runner's run base) says
            snapshots = diskspace.qemu_snapshot_dir(rundir.parent)
            return GuestDisk(image, diskspace.watch(snapshots, p.image, rundir, kept=False))
        watch = diskspace.watch(spec.cow, p.image, rundir, kept=True)
        fill = lambda _fd, new: _fill_overlay(new, image)  # noqa: E731
        lock_fd = cow.hold(spec.cow, fill, diskspace.filesystem_of(spec.cow).fstype)
        return GuestDisk(spec.cow.resolve(), watch, lock_fd)

    def network(self) -> GuestNetwork:
        return GuestNetwork("eth0" if self.prepared.net else None, False)

    holds_typed_keys = True  # its serial port loses what comes before the guest opens it

    def stdio(self, fds: GuestFds) -> tuple[int, int]:
        # An interactive guest has the terminal as QEMU's own stdin and stdout.
        return fds.terminal if fds.terminal is not None else super().stdio(fds)

    def command(self, paths: RunPaths, fds: GuestFds, streams: Streams) -> list[str]:
        spec, p = self.spec, self.prepared
        launch = QemuLaunch(
            qemu=self.qemu,
            kernel=str(self.kernel),
            initrd=str(self.initrd),
            image=str(p.image.resolve()),
            accel=self.accel,
            mem_bytes=p.mem_bytes,
            ctl_dir=str(paths.ctl),
            out_dir=str(paths.out),
            job_dir=str(p.jobdir),
            log_fd=fds.log,
            stdout_fd=fds.stdout,
            stderr_fd=fds.stderr,
            terminal=fds.terminal is not None,
            name=p.umid,
            overlay=str(paths.disk) if spec.cow is not None else None,
            writable=spec.writable_image,
            netdev=p.net.qemu_netdev(str(paths.switch)) if p.net else None,
            extra=spec.extra,
            full_boot=spec.full_boot,
            stdout_port=streams.stdout is not StreamMode.TTY,
            stderr_port=streams.stderr is not StreamMode.TTY,
        )
        params = render_kernel_params(CTL_TAG, OUT_TAG, JOB_TAG, changes=p.changes is not None, ninep=True)
        argv = qemu_argv(launch, params)
        return netns_argv(self.bwrap) + argv if self.bwrap else argv  # in a network namespace of its own


def _fill_overlay(overlay: Path, image: Path) -> None:
    """A qcow2 overlay of ``image`` in the new, private file ``overlay`` (qemu-img keeps the mode of the file it fills)."""
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image), str(overlay)], package=QEMU_IMG_PACKAGE)


def check_overlay(overlay: Path, image: Path) -> None:
    """A --cow file for QEMU must be a qcow2 overlay of this very image, made or last used since the image
    last changed (qcow2 records no mtime of its base, as UML's COW header does), and not in use."""
    import json

    # --force-share: a read lock taken here, by a job that cow.hold is about to refuse, could make the running
    # job's QEMU fail to take its write lock as it starts; "in use" is cow.hold's answer.
    result = run([QEMU_IMG, "info", "--force-share", "--output=json", str(overlay)], check=False, package=QEMU_IMG_PACKAGE)
    try:
        info = json.loads(result.stdout)
    except ValueError:
        info = {}
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    specific = info.get("format-specific", {}).get("data", {})
    if isinstance(specific, dict) and specific.get("data-file"):  # QEMU would write the guest's sectors there
        raise CowError(f"--cow {overlay} keeps its data in another file ({specific['data-file']}); give a new file name")
    if info.get("format") != "qcow2" or not backing:
        raise CowError(f"--cow {overlay} is not a QEMU overlay (qcow2 with a backing image); give a new file name")
    if Path(backing).resolve() != image.resolve():
        raise CowError(f"--cow {overlay} belongs to the image {backing}, not {image}; use it with that image")
    base = image.stat()
    # The ctime too: a user can put an image's mtime back, not its ctime.
    changed_ns = max(base.st_mtime_ns, base.st_ctime_ns)
    if info.get("virtual-size") != base.st_size or changed_ns > overlay.stat().st_mtime_ns:
        raise CowError(
            f"--cow {overlay} was made against {image} before the image changed (size, mtime or ctime); "
            "use the unchanged base image, or give a new --cow file"
        )

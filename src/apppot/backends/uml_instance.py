"""A job's guest under User-mode Linux: its kernel, sandbox, COW and command line.

UML runs as a plain process inside a bubblewrap sandbox that shows it only the kernel,
the image, the COW, the job's directories and its own; the guest's disk writes go to a
COW file over the read-only image (apppot.cow).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from apppot import cow, cpu, diskspace
from apppot.backends.base import GuestDisk, GuestFds, GuestNetwork, Instance, Prepared, RunPaths
from apppot.backends.uml import UmlLaunch, cmdline_length, personality_prefix, uml_argv
from apppot.errors import UsageError
from apppot.jobdir import check_outside
from apppot.kernel import FoundKernel, KernelTraits, find_kernel, kernel_traits, shared_libraries
from apppot.network import choose_network
from apppot.proc import which
from apppot.protocol import KERNEL_CMDLINE_LIMIT, render_kernel_params
from apppot.sandbox import Bind, binds_open_files, bwrap_argv, find_bwrap, is_setuid, probe, require_or_warn
from apppot.say import Say
from apppot.spec import PAGE, JobSpec, choose_mem
from apppot.streams import Streams

# Paths inside the sandbox.
SANDBOX_KERNEL = "/apppot/linux"
SANDBOX_COW = "/apppot/cow"
SANDBOX_CTL = "/apppot/ctl"
SANDBOX_OUT = "/apppot/out"
SANDBOX_JOB = "/apppot/job"
SANDBOX_UML_DIR = "/apppot/uml"
TEMP_COW = "job.cow"  # in the run directory, when the user gave no --cow
# Without namespaces paths reach UML through its command line, where blanks, commas and quotes break them.
HOSTFS_SAFE = re.compile(r"/[^\s,\"]*")


def read_max_map_count() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530


class UmlInstance(Instance):
    name = "UML"

    def __init__(self, spec: JobSpec, prepared: Prepared, kernel: FoundKernel, traits: KernelTraits, bwrap: str | None) -> None:
        super().__init__(spec, prepared)
        self.kernel = kernel
        self.traits = traits
        self.bwrap = bwrap  # None: UML runs without a sandbox (with a warning)

    @classmethod
    def prepare(cls, spec: JobSpec, say: Say, common: Prepared) -> UmlInstance:
        """The kernel, memory, network, sandbox and CPU for a UML guest; ``common`` has the rest."""
        kernel = find_kernel(spec.kernel)
        check_outside(common.jobdir, kernel.path, "the kernel", "keep kernels outside the job directory")
        traits = kernel_traits(kernel.path, say if spec.verbose else None)
        if spec.verbose:
            mode = "seccomp" if traits.seccomp_works else "ptrace"
            why = "" if traits.seccomp_works else (" (seccomp mode refused by this host)" if traits.seccomp_option else "")
            say(f"kernel: {kernel.path} (chosen by {kernel.source.value}), {mode} mode{why}")
        bwrap = find_bwrap()
        warning = require_or_warn(spec.isolation, probe(bwrap))
        pin = cpu.choose_cpu(spec.cpu, os.sched_getaffinity(0), cpu.current_cpu())
        if spec.verbose:
            say(f"guest pinned to host CPU {pin}" if pin is not None else "guest not pinned to a host CPU")
        if warning:
            for path, what in ((common.jobdir, "job directory"), (common.image, "image")):
                if not HOSTFS_SAFE.fullmatch(str(path)):
                    raise UsageError(f"the {what} path {path} has blanks or commas, which AppPot can only pass with namespaces")
        mem, mem_warning = choose_mem(spec.mem_bytes, read_max_map_count(), os.sysconf("SC_PHYS_PAGES") * PAGE)
        prepared = common._replace(
            mem_bytes=mem,
            net=choose_network(traits, spec.net, spec.host_loopback),
            cpu=pin,
            warnings=common.warnings + ((mem_warning,) if mem_warning else ()),
            notices=common.notices + ((warning,) if warning else ()),
        )
        if spec.cow is not None and spec.cow.exists():
            cow.check_matches(spec.cow, common.image, common.fs_uuid)
            cow.check_writable_without_privilege(spec.cow)
            cow.check_unlocked(spec.cow)
        return cls(spec, prepared, kernel, traits, None if warning else bwrap)

    def disk(self, rundir: Path) -> GuestDisk:
        spec, p = self.spec, self.prepared
        if spec.writable_image:
            image = p.image.resolve()
            return GuestDisk(image, diskspace.watch(image, p.image, rundir, kept=True))
        target = spec.cow if spec.cow is not None else rundir / TEMP_COW
        watch = diskspace.watch(target, p.image, rundir, kept=spec.cow is not None)
        if spec.cow is None:
            cow.create(target, p.image, p.fs_uuid)
            return GuestDisk(target.resolve(), watch)
        fill = lambda fd, _new: cow.fill(fd, p.image, p.fs_uuid)  # noqa: E731
        lock_fd = cow.hold(target, fill, diskspace.filesystem_of(target).fstype)
        return GuestDisk(target.resolve(), watch, lock_fd)

    def inherited_fds(self) -> list[int]:
        image_fd = self._bound_image_fd()
        return [image_fd] if image_fd is not None else []

    def _bound_image_fd(self) -> int | None:
        """The checked image's descriptor, when bubblewrap binds it (else UML opens the image by its name)."""
        fd = self.prepared.image_fd
        if fd is None or self.bwrap is None or self.spec.writable_image or not binds_open_files(self.bwrap):
            return None
        return fd

    def network(self) -> GuestNetwork:
        net = self.prepared.net
        return GuestNetwork(net.interface if net else None, net is not None and self.traits.ip_autoconfig)

    @property
    def needs_death_signal(self) -> bool:
        return self.bwrap is None  # bubblewrap ends UML when AppPot dies (--die-with-parent)

    def command(self, paths: RunPaths, fds: GuestFds, streams: Streams) -> list[str]:
        spec, p = self.spec, self.prepared
        sandboxed = self.bwrap is not None
        net_params: tuple[str, ...] = ()
        if p.net is not None:
            ip = [p.net.kernel_ip_param()] if self.traits.ip_autoconfig else []
            net_params = (p.net.uml_param(str(paths.switch)), *ip)
        launch = UmlLaunch(
            kernel=SANDBOX_KERNEL if sandboxed else str(self.kernel.path),
            base="" if spec.writable_image else cow.uml_base_path(p.image, p.fs_uuid),
            cow=SANDBOX_COW if sandboxed else str(paths.disk),
            mem_bytes=p.mem_bytes,
            umid=p.umid,
            uml_dir=SANDBOX_UML_DIR if sandboxed else str(paths.own),
            log_fd=fds.log,
            stdout_fd=fds.stdout,
            stderr_fd=fds.stderr,
            terminal_fds=fds.terminal,
            net_params=net_params,
            kernel_params=tuple(self.traits.boot_params()),
            extra=spec.extra,
            full_boot=spec.full_boot,
        )
        agent_params = render_kernel_params(
            SANDBOX_CTL if sandboxed else str(paths.ctl),
            SANDBOX_OUT if sandboxed else str(paths.out),
            SANDBOX_JOB if sandboxed else str(p.jobdir),
            changes=p.changes is not None,
        )
        argv = uml_argv(launch, agent_params)
        if cmdline_length(argv) > KERNEL_CMDLINE_LIMIT:
            raise UsageError("the kernel command line is too long; use fewer or shorter --extra parameters")
        if self.bwrap is not None:
            setarch = which("setarch")
            sandbox = bwrap_argv(self.bwrap, self.sandbox_binds(paths), proc=setarch is None or is_setuid(self.bwrap))
            argv = personality_prefix(setarch) + sandbox + argv
        return argv

    def sandbox_binds(self, paths: RunPaths) -> list[Bind]:
        """All the sandbox shows UML: read-only unless the guest must write it."""
        p = self.prepared
        binds = [Bind(str(self.kernel.path), SANDBOX_KERNEL)]
        binds += [Bind(str(lib), str(lib)) for lib in shared_libraries(self.kernel.path)]
        if p.net is not None:  # the switch, which the helper makes before UML starts, at its own path
            binds += [Bind(str(src), str(dst)) for src, dst in p.net.sandbox_files(shared_libraries)]
            binds.append(Bind(str(paths.switch), str(paths.switch), writable=True))
        if not self.spec.writable_image:
            # The very file whose content id was checked, when it was (its name may have been given to another since).
            binds.append(Bind(str(p.image.resolve()), cow.uml_base_path(p.image, p.fs_uuid), fd=self._bound_image_fd()))
        binds += [
            Bind(str(paths.disk), SANDBOX_COW, writable=True),
            Bind(str(paths.ctl), SANDBOX_CTL),  # read-only: even guest root cannot plant anything there
            Bind(str(paths.out), SANDBOX_OUT, writable=True),
            Bind(str(p.jobdir), SANDBOX_JOB, writable=True),
            Bind(str(paths.own), SANDBOX_UML_DIR, writable=True),
        ]
        return binds

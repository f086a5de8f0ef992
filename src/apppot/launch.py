"""The hypervisor's command line for a prepared job: UML in its sandbox, or QEMU in its network namespace.

No side effects: what it needs comes in as arguments, but for facts it looks up on the host
(`setarch`, whether bwrap is setuid, the kernel's libraries from ldd's cached answer), so the
runner only spawns what is built here.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from apppot import cow
from apppot.backends.qemu import CTL_TAG, JOB_TAG, OUT_TAG, QemuLaunch, qemu_argv
from apppot.backends.uml import UmlLaunch, cmdline_length, personality_prefix, uml_argv
from apppot.errors import UsageError
from apppot.kernel import shared_libraries
from apppot.prepare import Prepared
from apppot.proc import which
from apppot.protocol import KERNEL_CMDLINE_LIMIT, StreamMode, render_kernel_params
from apppot.sandbox import Bind, bwrap_argv, is_setuid, netns_argv
from apppot.spec import JobSpec
from apppot.streams import Streams

# Paths inside the sandbox.
SANDBOX_KERNEL = "/apppot/linux"
SANDBOX_COW = "/apppot/cow"
SANDBOX_CTL = "/apppot/ctl"
SANDBOX_OUT = "/apppot/out"
SANDBOX_JOB = "/apppot/job"
SANDBOX_UML_DIR = "/apppot/uml"


class RunPaths(NamedTuple):
    """Where one run keeps its files on the host."""

    ctl: Path  # the control directory (host -> guest)
    out: Path  # the report directory (guest -> host)
    uml_dir: Path  # UML's own files (umid)
    cow: Path  # the COW or overlay the guest writes
    switch: Path  # the NAT helper's switch


class GuestFds(NamedTuple):
    """The descriptors the hypervisor inherits."""

    log: int
    stdout: int
    stderr: int
    terminal: tuple[int, int] | None  # (stdin, stdout) of an interactive session


def qemu_command(spec: JobSpec, p: Prepared, paths: RunPaths, fds: GuestFds, streams: Streams) -> list[str]:
    assert p.qemu is not None
    q = p.qemu
    launch = QemuLaunch(
        qemu=q.qemu,
        kernel=str(q.kernel),
        initrd=str(q.initrd),
        image=str(p.image.resolve()),
        accel=q.accel,
        mem_bytes=p.mem_bytes,
        ctl_dir=str(paths.ctl),
        out_dir=str(paths.out),
        job_dir=str(p.jobdir),
        log_fd=fds.log,
        stdout_fd=fds.stdout,
        stderr_fd=fds.stderr,
        terminal=fds.terminal is not None,
        name=p.umid,
        overlay=str(paths.cow) if spec.cow is not None else None,
        writable=spec.writable_image,
        netdev=p.net.qemu_netdev(str(paths.switch)) if p.net else None,
        extra=spec.extra,
        full_boot=spec.full_boot,
        stdout_port=streams.stdout is not StreamMode.TTY,
        stderr_port=streams.stderr is not StreamMode.TTY,
    )
    params = render_kernel_params(CTL_TAG, OUT_TAG, JOB_TAG, changes=p.changes is not None, ninep=True)
    argv = qemu_argv(launch, params)
    return netns_argv(p.bwrap) + argv if p.bwrap else argv  # in a network namespace of its own


def uml_command(spec: JobSpec, p: Prepared, paths: RunPaths, fds: GuestFds) -> list[str]:
    assert p.kernel is not None and p.traits is not None
    sandboxed = p.bwrap is not None
    net_params: tuple[str, ...] = ()
    if p.net is not None:
        net_params = (p.net.uml_param(str(paths.switch)), *([p.net.kernel_ip_param()] if p.traits.ip_autoconfig else []))
    launch = UmlLaunch(
        kernel=SANDBOX_KERNEL if sandboxed else str(p.kernel.path),
        base="" if spec.writable_image else cow.uml_base_path(p.image, p.fs_uuid),
        cow=SANDBOX_COW if sandboxed else str(paths.cow),
        mem_bytes=p.mem_bytes,
        umid=p.umid,
        uml_dir=SANDBOX_UML_DIR if sandboxed else str(paths.uml_dir),
        log_fd=fds.log,
        stdout_fd=fds.stdout,
        stderr_fd=fds.stderr,
        terminal_fds=fds.terminal,
        net_params=net_params,
        kernel_params=tuple(p.traits.boot_params()),
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
    if p.bwrap is not None:
        setarch = which("setarch")
        binds = sandbox_binds(spec, p, paths)
        argv = bwrap_argv(p.bwrap, binds, proc=setarch is None or is_setuid(p.bwrap)) + argv
        argv = personality_prefix(setarch) + argv
    return argv


def sandbox_binds(spec: JobSpec, p: Prepared, paths: RunPaths) -> list[Bind]:
    """All the sandbox shows UML: read-only unless the guest must write it."""
    assert p.kernel is not None
    binds = [Bind(str(p.kernel.path), SANDBOX_KERNEL)]
    binds += [Bind(str(lib), str(lib)) for lib in shared_libraries(p.kernel.path)]
    if p.net is not None:  # the switch, which the helper makes before UML starts, at its own path
        binds += [Bind(str(src), str(dst)) for src, dst in p.net.sandbox_files(shared_libraries)]
        binds.append(Bind(str(paths.switch), str(paths.switch), writable=True))
    if not spec.writable_image:
        binds.append(Bind(str(p.image.resolve()), cow.uml_base_path(p.image, p.fs_uuid)))
    binds += [
        Bind(str(paths.cow), SANDBOX_COW, writable=True),
        Bind(str(paths.ctl), SANDBOX_CTL),  # read-only: even guest root cannot plant anything there
        Bind(str(paths.out), SANDBOX_OUT, writable=True),
        Bind(str(p.jobdir), SANDBOX_JOB, writable=True),
        Bind(str(paths.uml_dir), SANDBOX_UML_DIR, writable=True),
    ]
    return binds

"""The lifecycle of one job: check inputs, start UML, relay streams, report, clean up.

All side effects of `apppot start` live here; what the command lines look like
is decided by the pure builders in protocol.py, backends/uml.py and sandbox.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

from apppot import cow, cpu
from apppot.backends.choice import Backend, Decision, KvmState, decide, requested
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
from apppot.backends.uml import AGENT_SERVICE, SYSTEMD_PATH, UmlLaunch, cmdline_length, personality_prefix, uml_argv
from apppot.channel import Channel
from apppot.errors import AppPotError, CowError, GuestDied, GuestMisbehaved, HostError, UsageError
from apppot.images import ext4, tiny
from apppot.images.store import cache_dir, resolve_image
from apppot.jobdir import check_jobdir, check_outside
from apppot.kernel import FoundKernel, KernelTraits, find_kernel, kernel_traits, shared_libraries
from apppot.nat import NatHelper
from apppot.network import Network, choose_network, choose_qemu_network
from apppot.proc import parent_death_signal, run, which
from apppot.protocol import (
    CHANGES_ARCHIVE,
    CHANGES_BASE,
    CHANGES_DELETE,
    JOB_FILE,
    KERNEL_CMDLINE_LIMIT,
    STATUS_FILE,
    GuestJob,
    StdinMode,
    StreamMode,
    parse_status,
    render_job_file,
    render_kernel_params,
)
from apppot.rundir import RunDir, sweep_stale
from apppot.sandbox import Bind, bwrap_argv, find_bwrap, is_setuid, netns_argv, probe, require_netns_or_warn, require_or_warn
from apppot.spec import DEFAULT_MEM, JobSpec, choose_mem
from apppot.streams import Relay, StdinSpool, Streams, detect_streams

# Paths inside the sandbox.
SANDBOX_KERNEL = "/apppot/linux"
SANDBOX_COW = "/apppot/cow"
SANDBOX_CTL = "/apppot/ctl"
SANDBOX_OUT = "/apppot/out"
SANDBOX_JOB = "/apppot/job"
SANDBOX_UML_DIR = "/apppot/uml"

STOP_GRACE_S = 2.0  # after SIGTERM, before SIGKILL
POWEROFF_GRACE_S = 10.0  # after the job reported, for the guest to power off

AUTO_CHANGES = "apppot-changes.tar.gz"  # merged at boot when found in the job directory
_UMID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HOSTFS_SAFE = re.compile(r"/[^\s,\"]*")

Say = Callable[[str], None]


def say_stderr(message: str) -> None:
    sys.stderr.write(f"apppot: {message}\n")
    sys.stderr.flush()


class QemuSetup(NamedTuple):
    """What a QEMU job runs: QEMU, the guest kernel and its initramfs, the accelerator."""

    qemu: str
    kernel: Path  # what QEMU boots directly (guest_kernel.direct_kernel)
    initrd: Path
    accel: Accel


class Prepared(NamedTuple):
    """The checked inputs of a job, resolved against this host."""

    kernel: FoundKernel | None  # UML's; None under QEMU
    traits: KernelTraits | None
    image: Path
    fs_uuid: str
    jobdir: Path
    mem_bytes: int
    net: Network | None  # the NAT helper the guest's network goes through
    bwrap: str | None
    umid: str
    cpu: int | None = None  # the host CPU the guest is pinned to
    changes: Path | None = None  # a changes archive to merge at boot (checked as it is copied, before the boot)
    warnings: tuple[str, ...] = ()
    qemu: QemuSetup | None = None  # set when the job runs under QEMU


def _read_max_map_count() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530


def _default_image(say: Say) -> Path:
    target = tiny.image_path()
    if not target.exists():
        say(f"building the default appliance (first use) into {target} ...")
        tiny.build()
    return target


def choose_backend(spec: JobSpec, say: Say) -> Decision:
    """--backend, $APPPOT_BACKEND, the config file, else UML; KVM probed where it matters."""
    backend, where = requested(spec.backend, os.environ)
    decision = decide(backend, where, spec.kvm, lambda: kvm_state(say))
    if spec.verbose:
        say(f"backend: {decision.why}")
    return decision


def kvm_state(say: Say) -> KvmState:
    from apppot import kvm

    return kvm.state(say)


def _qemu_setup(accel: Accel, say: Say) -> QemuSetup:
    from apppot import guest_kernel

    qemu = which(QEMU_SYSTEM)
    if qemu is None:
        raise HostError(f"{QEMU_SYSTEM} is not installed: sudo apt-get install {QEMU_PACKAGE}")
    kernel = guest_kernel.find(say)
    return QemuSetup(qemu, guest_kernel.direct_kernel(kernel), guest_kernel.initramfs(kernel), accel)


def prepare(spec: JobSpec, say: Say, decision: Decision | None = None) -> Prepared:
    """Check everything about the job that can be checked before booting."""
    jobdir = check_jobdir(spec.jobdir, spec.unsafe_jobdir)
    fix = "set XDG_CACHE_HOME and TMPDIR to places outside it, or use another --jobdir"
    check_outside(jobdir, cache_dir(), "AppPot's cache", fix)
    check_outside(jobdir, run_base(), "the directory for AppPot's run files (TMPDIR)", fix)
    image = resolve_image(str(spec.image)) if spec.image is not None else _default_image(say)
    fs_uuid = ext4.filesystem_uuid(image)  # also says when the image is missing or unreadable
    decision = decision or choose_backend(spec, say)
    if decision.backend is Backend.QEMU:
        return _prepare_qemu(spec, say, decision, jobdir, image, fs_uuid)
    kernel = find_kernel(spec.kernel)
    check_outside(jobdir, kernel.path, "the kernel", "keep kernels outside the job directory")
    traits = kernel_traits(kernel.path, say if spec.verbose else None)
    if spec.verbose:
        mode = "seccomp" if traits.seccomp_works else "ptrace"
        why = "" if traits.seccomp_works else (" (seccomp mode refused by this host)" if traits.seccomp_option else "")
        say(f"kernel: {kernel.path} (chosen by {kernel.source.value}), {mode} mode{why}")
    mem = choose_mem(spec.mem_bytes, _read_max_map_count())
    net = choose_network(traits, spec.net, spec.host_loopback)
    umid = _instance_id(spec)
    bwrap = find_bwrap()
    warning = require_or_warn(spec.isolation, probe(bwrap))
    warnings = (warning,) if warning else ()
    pin = cpu.choose_cpu(spec.cpu, os.sched_getaffinity(0), cpu.current_cpu())
    if spec.verbose:
        say(f"guest pinned to host CPU {pin}" if pin is not None else "guest not pinned to a host CPU")
    changes = spec.changes if spec.changes is not None else _auto_changes(jobdir)
    prepared = Prepared(
        kernel, traits, image, fs_uuid, jobdir, mem, net, None if warning else bwrap, umid, pin, changes, warnings
    )
    if warning:
        for path, what in ((jobdir, "job directory"), (image, "image")):
            if not _HOSTFS_SAFE.fullmatch(str(path)):
                raise UsageError(f"the {what} path {path} has blanks or commas, which AppPot can only pass with namespaces")
    _check_image_use(spec, image, fs_uuid)
    return prepared


def _prepare_qemu(spec: JobSpec, say: Say, decision: Decision, jobdir: Path, image: Path, fs_uuid: str) -> Prepared:
    assert decision.accel is not None
    setup = _qemu_setup(decision.accel, say)
    umid = _instance_id(spec)
    for path, what in ((jobdir, "job directory"), (image, "image")):
        if "," in str(path):
            raise UsageError(f"the {what} path {path} has a comma, which QEMU cannot take; rename or move it")
    # QEMU's emulation runs on several host threads: it is pinned only when asked for a CPU.
    pin = cpu.choose_cpu(spec.cpu, os.sched_getaffinity(0), cpu.current_cpu()) if spec.cpu not in (None, "auto") else None
    changes = spec.changes if spec.changes is not None else _auto_changes(jobdir)
    bwrap = find_bwrap()
    netns_warning = require_netns_or_warn(spec.isolation, probe(bwrap))
    warnings = tuple(w for w in (decision.warning, netns_warning) if w)
    mem = spec.mem_bytes or DEFAULT_MEM
    net = choose_qemu_network(spec.net, spec.host_loopback)
    bwrap = None if netns_warning else bwrap
    prepared = Prepared(None, None, image, fs_uuid, jobdir, mem, net, bwrap, umid, pin, changes, warnings, setup)
    _check_image_use(spec, image, fs_uuid, qemu=True)
    return prepared


def _instance_id(spec: JobSpec) -> str:
    """--id, checked, or a name made of apppot's pid: UML's umid, QEMU's -name."""
    umid = spec.instance_id or f"apppot-{os.getpid()}"
    if not _UMID.fullmatch(umid):
        raise UsageError(f"invalid --id {umid!r}: use letters, digits, '.', '_' and '-'")
    return umid


def _check_overlay(overlay: Path, image: Path) -> None:
    """A --cow file for QEMU must be a qcow2 overlay of this very image, made or last used since the image
    last changed (qcow2 records no mtime of its base, as UML's COW header does), and not in use."""
    import json

    result = run([QEMU_IMG, "info", "--output=json", str(overlay)], check=False, package=QEMU_IMG_PACKAGE)
    if b"Is another process using the image" in result.stderr:  # the write lock QEMU holds while a job runs
        raise CowError(f"--cow {overlay} is in use by another running job; wait for it, or use another --cow")
    try:
        info = json.loads(result.stdout)
    except ValueError:
        info = {}
    backing = info.get("full-backing-filename") or info.get("backing-filename")
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


def _check_image_use(spec: JobSpec, image: Path, fs_uuid: str, qemu: bool = False) -> None:
    """--full-boot, --writable-image and --cow, against the image."""
    if spec.full_boot:
        _check_full_boot(image)
    if spec.writable_image:
        if spec.cow is not None:
            raise UsageError("--writable-image and --cow exclude each other: the job writes either the image or the COW")
        # Also as root: UML opens an image without write permission read-only, and the job would fail later.
        if not os.access(image, os.W_OK) or not image.stat().st_mode & 0o222:
            raise UsageError(
                f"--writable-image: {image} is not writable by you; make it writable (chmod u+w) to change it on purpose"
            )
    if spec.cow is not None:
        if spec.cow.resolve() == image.resolve():
            raise UsageError("--cow names the base image itself; give a separate file for the COW")
        if spec.cow.exists() and qemu:
            _check_overlay(spec.cow, image)
        elif spec.cow.exists():
            cow.check_matches(spec.cow, image, fs_uuid)
            cow.check_writable_without_privilege(spec.cow)
            cow.check_unlocked(spec.cow)


def _auto_changes(jobdir: Path) -> Path | None:
    """apppot-changes.tar.gz in the job directory, merged without being asked for (checked in _put_changes)."""
    path = jobdir / AUTO_CHANGES
    return path if path.is_file() else None


def _check_full_boot(image: Path) -> None:
    missing = ext4.missing_paths(image, [SYSTEMD_PATH, AGENT_SERVICE])
    if missing:
        raise UsageError(
            f"--full-boot needs systemd and AppPot's agent service in the image, and {image} lacks {', '.join(missing)}: "
            "build it from a recipe whose packages include systemd, or start it without --full-boot"
        )


class Job:
    """The running state of one job; ``run`` drives it to its end."""

    rundir: Path

    def __init__(self, spec: JobSpec, prepared: Prepared, say: Say, deadline_s: float | None = None) -> None:
        self.spec = spec
        self.deadline_s = deadline_s  # the guest is stopped if the job has not ended by then (the KVM probe)
        self.prepared = prepared
        self.say = say
        self.proc: subprocess.Popen[bytes] | None = None
        self.nat: NatHelper | None = None
        self.signal_received: int | None = None
        self.stdout_broken = False
        self.timed_out = False
        self.failure: AppPotError | None = None  # what ended the job early (the guest misbehaving)
        self.exited = threading.Event()
        self.wake = threading.Event()

    def run(self) -> int:
        with self._rundir(), self._signals():
            return self._run()

    @contextlib.contextmanager
    def _rundir(self) -> Iterator[None]:
        base = run_base()
        for name in sweep_stale(base):
            if self.spec.verbose:
                self.say(f"removed {base / name}, left by an AppPot that was killed")
        held = RunDir(base)
        self.rundir = held.path
        try:
            yield
        finally:
            self._stop_guest()
            held.release()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self.signal_received = signum
            self.wake.set()

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _paths(self) -> tuple[Path, Path]:
        uml_dir = self.rundir / "uml"
        uml_dir.mkdir()
        return uml_dir, self.rundir / "job.cow"

    def _cow(self, temp_cow: Path) -> Path:
        p = self.prepared
        if self.spec.writable_image:
            return p.image.resolve()
        if p.qemu is not None:  # the job's writes go to QEMU's snapshot, or to a qcow2 overlay the user keeps
            if self.spec.cow is None:
                return p.image.resolve()
            if not self.spec.cow.exists():
                _create_overlay(self.spec.cow, p.image.resolve())
            return self.spec.cow.resolve()
        target = self.spec.cow if self.spec.cow is not None else temp_cow
        if not target.exists():
            cow.create(target, p.image, p.fs_uuid)
        return target.resolve()

    def _log(self) -> tuple[int, Path, bool]:
        """The console log: the user's --console-log, or a file kept only if needed."""
        if self.spec.console_log is not None:
            path = self.spec.console_log
            keep = True
        else:
            logs = cache_dir() / "logs"
            logs.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = logs / f"{self.prepared.umid}-{self.rundir.name}.log"
            keep = self.spec.verbose
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise HostError(f"cannot write the console log {path}: {e.strerror}") from e
        if self.spec.verbose:
            self.say(f"console log: {path}")
        return fd, path, keep

    def _run(self) -> int:
        p = self.prepared
        for warning in p.warnings:
            self.say(warning)
        uml_dir, temp_cow = self._paths()
        channel = Channel(self.rundir)
        try:
            return self._run_with(channel, uml_dir, temp_cow)
        finally:
            channel.close()

    def _run_with(self, channel: Channel, uml_dir: Path, temp_cow: Path) -> int:
        p = self.prepared
        ctl = channel.ctl
        if p.changes is not None:  # first: a refused archive stops the job before anything is opened
            _put_changes(ctl, p, self.say if self.spec.verbose else None)
        cow_path = self._cow(temp_cow)
        streams = detect_streams()
        # The job file first: a job it refuses leaves no console log and no open descriptor behind.
        channel.send(JOB_FILE, render_job_file(self._guest_job(streams)))
        log_fd, log_path, keep_log = self._log()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        terminal: tuple[int, int] | None = None
        if streams.interactive:
            terminal = (os.dup(0), os.dup(1))
        if p.qemu is not None:
            argv = self._qemu_argv(p.qemu, channel, cow_path, log_fd, out_w, err_w, terminal, streams)
        else:
            argv = self._uml_argv(channel, uml_dir, cow_path, log_fd, out_w, err_w, terminal)
        if self.spec.verbose:
            self.say(f"running: {shlex.join(argv)}")

        saved_tty = _save_termios(0) if terminal else None
        pass_fds = [log_fd, out_w, err_w, *(terminal or ())]
        affinity = os.sched_getaffinity(0)
        try:
            if p.net is not None:  # first, on no pinned CPU; the hypervisor joins its switch as it boots
                self.nat = NatHelper.start(p.net, self._switch(), log_fd, self.spec.verbose)
            if p.cpu is not None:  # inherited by UML and all its processes; this thread's is restored below
                os.sched_setaffinity(0, {p.cpu})
            # An interactive QEMU guest has the terminal as QEMU's own stdin and stdout.
            qemu_terminal = terminal if p.qemu is not None else None
            self.proc = subprocess.Popen(
                argv,
                stdin=qemu_terminal[0] if qemu_terminal else subprocess.DEVNULL,
                stdout=qemu_terminal[1] if qemu_terminal else log_fd,
                stderr=log_fd,
                pass_fds=pass_fds,
                start_new_session=True,
                env=_uml_env(self.rundir),
                # bubblewrap ends UML when AppPot dies (--die-with-parent); QEMU, and UML without it, end so.
                preexec_fn=parent_death_signal(signal.SIGTERM) if p.qemu is not None or p.bwrap is None else None,
            )
        except OSError as e:
            raise HostError(f"cannot start {argv[0]}: {e.strerror}") from e
        finally:
            if p.cpu is not None:
                os.sched_setaffinity(0, affinity)
            for fd in pass_fds:
                os.close(fd)
        threading.Thread(target=self._wait_uml, name="apppot-wait", daemon=True).start()
        relays = [Relay(out_r, 1, self._broken_stdout), Relay(err_r, 2, lambda: None)]
        for relay in relays:
            relay.start()
        spool = StdinSpool(channel, self.wake.set) if streams.stdin is StdinMode.SPOOL else None
        if spool:
            spool.start()
        try:
            status = self._supervise(channel, spool)
        finally:
            if spool:
                spool.stop.set()
            self._stop_guest()
            for relay in relays:
                relay.join(timeout=5)
            if saved_tty is not None:
                _restore_termios(saved_tty)
        return self._outcome(status, log_path, keep_log)

    def _guest_job(self, streams: Streams) -> GuestJob:
        p = self.prepared
        uid, gid, user, group = guest_identity(self.spec.user, self.spec.group)
        rows, cols = _terminal_size()
        if p.qemu is not None:
            net, net_configured = ("eth0" if p.net else None), False
        else:
            assert p.traits is not None
            net, net_configured = (p.net.interface if p.net else None), p.net is not None and p.traits.ip_autoconfig
        return GuestJob(
            argv=self.spec.argv,
            uid=uid,
            gid=gid,
            user=user,
            group=group,
            stdin=streams.stdin,
            stdout=streams.stdout,
            stderr=streams.stderr,
            interactive=streams.interactive,
            term=os.environ.get("TERM") if streams.interactive or streams.stdout is StreamMode.TTY else None,
            rows=rows,
            cols=cols,
            net=net,
            net_configured=net_configured,
            keep_cow=self.spec.cow is not None or self.spec.writable_image,
        )

    def _qemu_argv(
        self,
        q: QemuSetup,
        channel: Channel,
        cow_path: Path,
        log_fd: int,
        out_w: int,
        err_w: int,
        terminal: tuple[int, int] | None,
        streams: Streams,
    ) -> list[str]:
        p = self.prepared
        launch = QemuLaunch(
            qemu=q.qemu,
            kernel=str(q.kernel),
            initrd=str(q.initrd),
            image=str(p.image.resolve()),
            accel=q.accel,
            mem_bytes=p.mem_bytes,
            ctl_dir=str(channel.ctl),
            out_dir=str(channel.out),
            job_dir=str(p.jobdir),
            log_fd=log_fd,
            stdout_fd=out_w,
            stderr_fd=err_w,
            terminal=terminal is not None,
            name=p.umid,
            overlay=str(cow_path) if self.spec.cow is not None else None,
            writable=self.spec.writable_image,
            netdev=p.net.qemu_netdev(str(self._switch())) if p.net else None,
            extra=self.spec.extra,
            full_boot=self.spec.full_boot,
            stdout_port=streams.stdout is not StreamMode.TTY,
            stderr_port=streams.stderr is not StreamMode.TTY,
        )
        params = render_kernel_params(CTL_TAG, OUT_TAG, JOB_TAG, changes=p.changes is not None, ninep=True)
        argv = qemu_argv(launch, params)
        return netns_argv(p.bwrap) + argv if p.bwrap else argv  # in a network namespace of its own

    def _uml_argv(
        self,
        channel: Channel,
        uml_dir: Path,
        cow_path: Path,
        log_fd: int,
        out_w: int,
        err_w: int,
        terminal: tuple[int, int] | None,
    ) -> list[str]:
        p = self.prepared
        assert p.kernel is not None and p.traits is not None
        sandboxed = p.bwrap is not None
        net_params: tuple[str, ...] = ()
        if p.net is not None:
            net_params = (p.net.uml_param(str(self._switch())), *([p.net.kernel_ip_param()] if p.traits.ip_autoconfig else []))
        launch = UmlLaunch(
            kernel=SANDBOX_KERNEL if sandboxed else str(p.kernel.path),
            base="" if self.spec.writable_image else cow.uml_base_path(p.image, p.fs_uuid),
            cow=SANDBOX_COW if sandboxed else str(cow_path),
            mem_bytes=p.mem_bytes,
            umid=p.umid,
            uml_dir=SANDBOX_UML_DIR if sandboxed else str(uml_dir),
            log_fd=log_fd,
            stdout_fd=out_w,
            stderr_fd=err_w,
            terminal_fds=terminal,
            net_params=net_params,
            kernel_params=tuple(p.traits.boot_params()),
            extra=self.spec.extra,
            full_boot=self.spec.full_boot,
        )
        agent_params = render_kernel_params(
            SANDBOX_CTL if sandboxed else str(channel.ctl),
            SANDBOX_OUT if sandboxed else str(channel.out),
            SANDBOX_JOB if sandboxed else str(p.jobdir),
            changes=p.changes is not None,
        )
        argv = uml_argv(launch, agent_params)
        if cmdline_length(argv) > KERNEL_CMDLINE_LIMIT:
            raise UsageError("the kernel command line is too long; use fewer or shorter --extra parameters")
        if sandboxed:
            assert p.bwrap is not None
            setarch = which("setarch")
            binds = self._binds(cow_path, channel, uml_dir)
            argv = bwrap_argv(p.bwrap, binds, proc=setarch is None or is_setuid(p.bwrap)) + argv
            argv = personality_prefix(setarch) + argv
        return argv

    def _binds(self, cow_path: Path, channel: Channel, uml_dir: Path) -> list[Bind]:
        p = self.prepared
        assert p.kernel is not None
        binds = [Bind(str(p.kernel.path), SANDBOX_KERNEL)]
        binds += [Bind(str(lib), str(lib)) for lib in shared_libraries(p.kernel.path)]
        if p.net is not None:  # the switch, which the helper makes before UML starts, at its own path
            binds += [Bind(str(src), str(dst)) for src, dst in p.net.sandbox_files(shared_libraries)]
            binds.append(Bind(str(self._switch()), str(self._switch()), writable=True))
        if not self.spec.writable_image:
            binds.append(Bind(str(p.image.resolve()), cow.uml_base_path(p.image, p.fs_uuid)))
        binds += [
            Bind(str(cow_path), SANDBOX_COW, writable=True),
            Bind(str(channel.ctl), SANDBOX_CTL),  # read-only: even guest root cannot plant anything there
            Bind(str(channel.out), SANDBOX_OUT, writable=True),
            Bind(str(p.jobdir), SANDBOX_JOB, writable=True),
            Bind(str(uml_dir), SANDBOX_UML_DIR, writable=True),
        ]
        return binds

    def _switch(self) -> Path:
        return self.rundir / "net"

    def _wait_uml(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self.exited.set()
        self.wake.set()

    def _broken_stdout(self) -> None:
        self.stdout_broken = True
        self.wake.set()

    def _supervise(self, channel: Channel, spool: StdinSpool | None) -> int | None:
        """Wait for the guest to end; returns the job's status if it reported one."""
        try:
            return self._await_status(channel, spool)
        except AppPotError as e:
            self.failure = e
            return None

    def _await_status(self, channel: Channel, spool: StdinSpool | None) -> int | None:
        reported_at: float | None = None
        deadline = time.monotonic() + self.deadline_s if self.deadline_s is not None else None
        while not self.exited.is_set():
            if deadline is not None and time.monotonic() > deadline:
                self.timed_out = True
                return None
            self.wake.wait(0.25)
            self.wake.clear()
            if self.signal_received is not None or self.stdout_broken:
                return None
            if spool is not None and spool.error is not None:
                raise spool.error
            if reported_at is None and channel.has_report(STATUS_FILE):
                channel.read_report(STATUS_FILE)  # a link, a pipe, a directory or a huge file ends the job now
                reported_at = time.monotonic()
            if reported_at is not None and time.monotonic() - reported_at > POWEROFF_GRACE_S:
                self.say("the guest did not power off after the job ended; stopping it")
                break
        data = channel.read_report(STATUS_FILE)
        if data is None:
            return None
        status = parse_status(data)
        if status is None:
            raise GuestMisbehaved(f"the guest reported {data[:20]!r} as the job's status, not a number 0-255")
        return status

    def _stop_guest(self) -> None:
        """Stop UML and every helper it started: SIGTERM to the group, then SIGKILL; then the NAT helper."""
        try:
            self._stop_hypervisor()
        finally:
            if self.nat is not None:
                self.nat.stop()

    def _stop_hypervisor(self) -> None:
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE_S)
        # Helpers may outlive UML itself; the group goes in any case.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()

    def _outcome(self, status: int | None, log_path: Path, keep_log: bool) -> int:
        if self.signal_received is not None:
            self.say(f"stopped by {signal.Signals(self.signal_received).name}; the job was ended")
            _discard_log(log_path, keep_log)
            return 128 + self.signal_received
        if self.failure is not None:
            raise self.failure
        if self.stdout_broken:
            _discard_log(log_path, keep_log)
            return 128 + signal.SIGPIPE
        if status is not None:
            _discard_log(log_path, keep_log)
            return status
        assert self.proc is not None
        if self.timed_out:
            raise GuestDied(f"the guest did not finish within {self.deadline_s:g} s and was stopped{_panic_hint(log_path)}")
        rc = self.proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        what = "QEMU" if self.prepared.qemu is not None else "UML"
        raise GuestDied(f"the guest ended without reporting the job's status ({what} {how}){_panic_hint(log_path)}")


def _put_changes(ctl: Path, p: Prepared, say: Say | None) -> None:
    """The archive's checked members, and what the agent needs besides tar, in the control directory.

    The archive is checked as it is copied, in one reading: the guest gets exactly what was checked,
    and never the user's own file."""
    from apppot import snap

    assert p.changes is not None
    try:
        info = snap.repack(str(p.changes), str(ctl / CHANGES_ARCHIVE))
    except snap.SnapError as e:
        raise UsageError(str(e)) from None
    (ctl / CHANGES_DELETE).write_text("".join(path.lstrip("/") + "\n" for path in info.deleted))
    (ctl / CHANGES_BASE).write_text(info.base + "\n")
    if say:
        say(f"merging {p.changes} (base {info.base[:16]}) before the job")


def _create_overlay(overlay: Path, image: Path) -> None:
    """A new qcow2 overlay of ``image``, private like UML's COW (qemu-img keeps the mode of the file it fills)."""
    try:
        os.close(os.open(overlay, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise CowError(f"cannot create the overlay {overlay}: {e.strerror}; choose a writable place for --cow") from e
    try:
        run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image), str(overlay)], package=QEMU_IMG_PACKAGE)
    except BaseException:
        overlay.unlink(missing_ok=True)
        raise


def run_base() -> Path:
    """Where run directories go: $TMPDIR, or /tmp where its path could not be given to UML."""
    base = os.environ.get("TMPDIR") or "/tmp"
    return Path(base if _HOSTFS_SAFE.fullmatch(base) else "/tmp")


def _panic_hint(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    reasons = [line.strip() for line in lines if "Kernel panic" in line or "Out of memory" in line or "apppot-boot:" in line]
    detail = f": {reasons[-1]}" if reasons else ""
    return f"{detail}; console log kept at {log_path}"


def _discard_log(path: Path, keep: bool) -> None:
    if not keep:
        with contextlib.suppress(OSError):
            path.unlink()


def guest_identity(user: str | None, group: str | None) -> tuple[int, int, str, str]:
    """uid, gid, user and group of the job inside: the host user's ids, or root for host root and --user root."""
    uid, gid = os.getuid(), os.getgid()
    if user == "root" or (user is None and uid == 0):
        return 0, 0, "root", "root"
    return uid, gid, user or "user", group or ("root" if gid == 0 else "user")


def _terminal_size() -> tuple[int | None, int | None]:
    for fd in (1, 0, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    return None, None


def _save_termios(fd: int) -> tuple[int, list[Any]] | None:
    import termios  # only interactive jobs need it; loading it costs a millisecond

    try:
        return fd, termios.tcgetattr(fd)
    except termios.error:
        return None


def _restore_termios(saved: tuple[int, list[Any]]) -> None:
    import termios

    fd, attrs = saved
    with contextlib.suppress(termios.error, OSError):
        termios.tcsetattr(fd, termios.TCSADRAIN, attrs)


def _uml_env(home: Path) -> dict[str, str]:
    # slirp refuses to start without HOME. UML keeps the guest's memory in a file under TMPDIR; without
    # it UML picks /dev/shm, where AppPot's 7.x kernel was seen to fail to start its processes.
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": os.environ.get("TMPDIR") or "/tmp"}


def start(spec: JobSpec, say: Say = say_stderr) -> int:
    """Run one job; returns the exit code for `apppot start`."""
    prepared = prepare(spec, say)
    return Job(spec, prepared, say).run()


__all__ = ["JobSpec", "start"]

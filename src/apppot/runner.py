"""The lifecycle of one job: start the hypervisor, relay streams, report, clean up.

All side effects of `apppot start` live here. What is checked before the boot is in
prepare.py, what the command lines look like in launch.py (and the pure builders it
calls), the files the host and guest exchange in channel.py.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from apppot import cow, userpath
from apppot.agent_watch import AgentWatch
from apppot.backends.qemu import QEMU_IMG, QEMU_IMG_PACKAGE
from apppot.channel import Channel
from apppot.errors import AppPotError, CowError, GuestDied, GuestMisbehaved, HostError, UsageError
from apppot.images.store import cache_dir
from apppot.launch import GuestFds, RunPaths, qemu_command, uml_command
from apppot.nat import NatHelper
from apppot.prepare import Prepared, Say, prepare, run_base, say_stderr
from apppot.proc import parent_death_signal, run
from apppot.protocol import (
    CHANGES_ARCHIVE,
    CHANGES_BASE,
    CHANGES_DELETE,
    JOB_FILE,
    STATUS_FILE,
    GuestJob,
    StdinMode,
    StreamMode,
    parse_status,
    render_job_file,
)
from apppot.rundir import RunDir, sweep_stale
from apppot.spec import JobSpec
from apppot.streams import Relay, StdinSpool, Streams, detect_streams, restore_termios, save_termios, terminal_size

STOP_GRACE_S = 2.0  # after SIGTERM, before SIGKILL
POWEROFF_GRACE_S = 10.0  # after the job reported, for the guest to power off


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
            for log in (cache_dir() / "logs").glob(f"*-{name}.log"):  # its console log, which no one was told of
                log.unlink(missing_ok=True)
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
        fd = userpath.open_for_writing(path, "the console log", HostError, "choose another file for --console-log")
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
        if p.changes is not None:  # first: a refused archive stops the job before anything is opened
            _put_changes(channel, p, self.say if self.spec.verbose else None, automatic=self.spec.changes is None)
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
        paths = RunPaths(channel.ctl, channel.out, uml_dir, cow_path, self.rundir / "net")
        fds = GuestFds(log_fd, out_w, err_w, terminal)
        argv = qemu_command(self.spec, p, paths, fds, streams) if p.qemu else uml_command(self.spec, p, paths, fds)
        if self.spec.verbose:
            self.say(f"running: {shlex.join(argv)}")

        saved_tty = save_termios(0) if terminal else None
        pass_fds = [log_fd, out_w, err_w, *(terminal or ())]
        affinity = os.sched_getaffinity(0)
        try:
            if p.net is not None:  # first, on no pinned CPU; the hypervisor joins its switch as it boots
                self.nat = NatHelper.start(p.net, paths.switch, log_fd, self.spec.verbose)
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
                env=_hypervisor_env(self.rundir),
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
        threading.Thread(target=self._wait_hypervisor, name="apppot-wait", daemon=True).start()
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
                restore_termios(saved_tty)
        return self._outcome(status, log_path, keep_log)

    def _guest_job(self, streams: Streams) -> GuestJob:
        p = self.prepared
        uid, gid, user, group = guest_identity(self.spec.user, self.spec.group)
        rows, cols = terminal_size()
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

    def _wait_hypervisor(self) -> None:
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
        agent_started = AgentWatch(channel, self.spec.boot_timeout_s)
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
            agent_started.check()
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
        """Stop UML or QEMU and every helper it started: SIGTERM to the group, then SIGKILL; then the NAT helper."""
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


def _put_changes(channel: Channel, p: Prepared, say: Say | None, automatic: bool) -> None:
    """The archive's checked members, and what the agent needs besides tar, in the control directory.

    The archive is checked as it is copied: the guest gets exactly what was checked, and never the
    user's own file. repack writes it by path (exclusively), before the guest has started."""
    from apppot import snap

    assert p.changes is not None
    try:
        info = snap.repack(str(p.changes), str(channel.ctl / CHANGES_ARCHIVE))
    except snap.SnapError as e:
        if automatic:  # found, not given: every later job in this directory would fail the same way
            raise UsageError(f"{e} (merged because it is in the job directory: remove or rename {p.changes})") from None
        raise UsageError(str(e)) from None
    channel.send(CHANGES_DELETE, "".join(path.lstrip("/") + "\n" for path in info.deleted).encode())
    channel.send(CHANGES_BASE, (info.base + "\n").encode())
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


def _hypervisor_env(home: Path) -> dict[str, str]:
    # slirp refuses to start without HOME. UML keeps the guest's memory in a file under TMPDIR; without
    # it UML picks /dev/shm, where AppPot's 7.x kernel was seen to fail to start its processes.
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(run_base())}


def start(spec: JobSpec, say: Say = say_stderr) -> int:
    """Run one job; returns the exit code for `apppot start`."""
    prepared = prepare(spec, say)
    return Job(spec, prepared, say).run()


__all__ = ["JobSpec", "start"]

"""The lifecycle of one job: start the hypervisor, relay streams, report, clean up.

All side effects of `apppot start` live here, and nothing here depends on the backend:
what is checked before the boot is in prepare.py, what each hypervisor needs (its disk,
command line and descriptors) in its backend instance (apppot.backends.base.Instance),
the files the host and guest exchange in channel.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from apppot import diskspace, userpath
from apppot.agent_watch import AgentWatch
from apppot.backends.base import GuestFds, Instance, RunPaths
from apppot.channel import Channel
from apppot.errors import AppPotError, GuestDied, GuestMisbehaved, HostError, UsageError
from apppot.logdir import open_log, stale_logs
from apppot.nat import NatHelper
from apppot.notices import say_once
from apppot.prepare import run_base
from apppot.proc import parent_death_signal
from apppot.protocol import (
    CHANGES_ARCHIVE,
    CHANGES_BASE,
    CHANGES_DELETE,
    JOB_FILE,
    STATUS_FILE,
    GuestJob,
    StreamMode,
    check_name,
    parse_status,
    render_job_file,
)
from apppot.relay import Relay, drain, lost_output, start_relays
from apppot.rundir import RunDir, sweep_stale
from apppot.say import Say
from apppot.stdin import StdinFeed, open_stdin
from apppot.streams import Streams, detect_streams, own_terminal_file, restore_termios, save_termios, terminal_size
from apppot.typeahead import HeldKeys, make_raw

if TYPE_CHECKING:
    from apppot.snap.checks import ArchiveInfo

STOP_GRACE_S = 2.0  # after SIGTERM, before SIGKILL
POWEROFF_GRACE_S = 10.0  # after the job reported, for the guest to power off


class Job:
    """The running state of one job; ``run`` drives it to its end."""

    rundir: Path

    def __init__(self, instance: Instance, say: Say, deadline_s: float | None = None) -> None:
        self.instance = instance
        self.spec = instance.spec
        self.deadline_s = deadline_s  # the guest is stopped if the job has not ended by then (the KVM probe)
        self.prepared = instance.prepared
        self.say = say
        self.proc: subprocess.Popen[bytes] | None = None
        self.nat: NatHelper | None = None
        self.held_keys: HeldKeys | None = None  # an interactive QEMU guest's keys, until its terminal is open
        self.signal_received: int | None = None
        self.stdout_broken = False
        self.timed_out = False
        self.failure: AppPotError | None = None  # what ended the job early (the guest misbehaving)
        self.exited = threading.Event()
        self.wake = threading.Event()
        self.cow_fd: int | None = None  # the --cow file, locked while the job runs (cow.hold)
        self.disk: diskspace.DiskWatch | None = None
        self.changes_info: ArchiveInfo | None = None  # what was checked of the changes archive merged at boot

    def run(self) -> int:
        with self._rundir(), self._signals():
            return self._run()

    @contextlib.contextmanager
    def _rundir(self) -> Iterator[None]:
        base = run_base()
        for name in sweep_stale(base):
            for log in stale_logs(base, self.prepared.jobdir, name):  # its console log, which no one was told of
                log.unlink(missing_ok=True)
            if self.spec.verbose:
                self.say(f"removed {base / name}, left by an AppPot that was killed")
        held = RunDir(base)
        self.rundir = held.path
        try:
            yield
        finally:
            self._stop_guest()
            if self.cow_fd is not None:  # the guest is gone: another job may have the COW
                os.close(self.cow_fd)
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

    def _own_dir(self) -> Path:
        """An empty directory for the hypervisor's own files (UML's umid directory)."""
        own = self.rundir / "hypervisor"
        own.mkdir()
        return own

    def _log(self) -> tuple[int, Path, bool]:
        """The console log: the user's --console-log, or a file kept only if needed."""
        if self.spec.console_log is not None:
            path = self.spec.console_log
            keep = True
            fd = userpath.open_for_writing(path, "the console log", HostError, "choose another file for --console-log")
        else:  # the user's state directory, or a safe place: never the cache, which may be read-only
            fd, path = open_log(f"{self.prepared.umid}-{self.rundir.name}.log", run_base(), self.rundir, self.prepared.jobdir)
            keep = self.spec.verbose
        # Appending: the hypervisor's own stderr and QEMU's console (which opens the log anew) share it.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        if self.spec.verbose:
            self.say(f"console log: {path}")
        return fd, path, keep

    def _run(self) -> int:
        p = self.prepared
        for warning in p.warnings:
            self.say(warning)
        for notice in p.notices:
            say_once(notice, self.say, verbose=self.spec.verbose, watched=os.isatty(2))
        own_dir = self._own_dir()
        channel = Channel(self.rundir)
        try:
            return self._run_with(channel, own_dir)
        finally:
            channel.close()

    def _run_with(self, channel: Channel, own_dir: Path) -> int:
        p = self.prepared
        if p.changes is not None:  # first: a refused archive stops the job before anything is opened
            self.changes_info = _put_changes(
                channel, p.changes, self.say if self.spec.verbose else None, automatic=self.spec.changes is None
            )
        disk = self.instance.disk(self.rundir)
        self.disk, self.cow_fd = disk.watch, disk.lock_fd
        streams = detect_streams(self.spec.no_stdin)
        # The job file first: a job it refuses leaves no console log and no open descriptor behind.
        channel.send(JOB_FILE, render_job_file(self._guest_job(streams)))
        log_fd, log_path, keep_log = self._log()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        terminal: tuple[int, int] | None = None
        saved_tty = save_termios(0) if streams.interactive else None
        if streams.interactive and self.instance.holds_typed_keys:
            self.held_keys = HeldKeys(0)
            terminal = (self.held_keys.read_end, own_terminal_file(1))
        elif streams.interactive:
            terminal = (os.dup(0), os.dup(1))
        paths = RunPaths(channel.ctl, channel.out, own_dir, disk.path, self.rundir / "net")
        fds = GuestFds(log_fd, out_w, err_w, terminal)
        argv = self.instance.command(paths, fds, streams)
        if self.spec.verbose:
            self.say(f"running: {shlex.join(argv)}")

        pass_fds = [log_fd, out_w, err_w, *(terminal or ()), *self.instance.inherited_fds()]
        affinity = os.sched_getaffinity(0)
        try:
            if p.net is not None:  # first, on no pinned CPU; the hypervisor joins its switch as it boots
                self.nat = NatHelper.start(p.net, paths.switch, log_fd, self.spec.verbose)
            if p.cpu is not None:  # inherited by UML and all its processes; this thread's is restored below
                os.sched_setaffinity(0, {p.cpu})
            stdin, stdout = self.instance.stdio(fds)
            self.instance.check_image_unchanged()  # last thing before the spawn: the window left is the exec
            if self.held_keys is not None:
                make_raw(0, isig=True)  # before the hypervisor starts: keys typed from now on are neither echoed nor lost
            self.proc = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=log_fd,
                pass_fds=pass_fds,
                start_new_session=True,
                env=_hypervisor_env(self.rundir),
                preexec_fn=parent_death_signal(signal.SIGTERM) if self.instance.needs_death_signal else None,
            )
        except BaseException as e:
            if saved_tty is not None:
                restore_termios(saved_tty)
            if isinstance(e, OSError):
                raise HostError(f"cannot start {argv[0]}: {e.strerror}") from e
            raise
        finally:
            if p.cpu is not None:
                os.sched_setaffinity(0, affinity)
            for fd in pass_fds:
                os.close(fd)
            if p.image_fd is not None and p.image_fd not in pass_fds:
                os.close(p.image_fd)
        threading.Thread(target=self._wait_hypervisor, name="apppot-wait", daemon=True).start()
        relays = start_relays(out_r, err_r, streams.stderr is StreamMode.STDOUT, self._broken_pipe)
        spool = open_stdin(streams.stdin, channel, self.wake.set)
        if spool:
            spool.start()
        try:
            status = self._supervise(channel, spool)
        finally:
            if spool:
                spool.stop.set()
            self._stop_guest()
            drain(relays, lambda: self.signal_received is not None)  # the guest's write ends are closed now
            if saved_tty is not None:
                restore_termios(saved_tty)
        if spool:
            try:
                spool.settle()  # the host's stdin is left just past what the job read
            except AppPotError as e:  # still through _outcome: a full disk is told first, the log kept
                self.failure = self.failure or e
        return self._outcome(status, log_path, keep_log, relays)

    def _guest_job(self, streams: Streams) -> GuestJob:
        uid, gid, user, group = guest_identity(self.spec.user, self.spec.group)
        rows, cols = terminal_size()
        net = self.instance.network()
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
            net=net.interface,
            net_configured=net.configured,
            keep_cow=self.spec.cow is not None or self.spec.writable_image,
        )

    def _wait_hypervisor(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self.exited.set()
        self.wake.set()

    def _broken_pipe(self) -> None:
        self.stdout_broken = True  # stdout's or stderr's reader went away
        self.wake.set()

    def _supervise(self, channel: Channel, spool: StdinFeed | None) -> int | None:
        """Wait for the guest to end; returns the job's status if it reported one."""
        try:
            return self._await_status(channel, spool)
        except AppPotError as e:
            self.failure = e
            return None

    def _await_status(self, channel: Channel, spool: StdinFeed | None) -> int | None:
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
            if agent_started.started and self.held_keys is not None:
                self.held_keys.release()
            if self.disk is not None:
                self.disk.sample()
            if reported_at is None and channel.has_report(STATUS_FILE):
                channel.read_report(STATUS_FILE)  # a link, a pipe, a directory or a huge file ends the job now
                reported_at = time.monotonic()
            if reported_at is not None and time.monotonic() - reported_at > POWEROFF_GRACE_S:
                if self.spec.verbose:  # after the job's output: the job's stderr is the job's
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

    def _outcome(self, status: int | None, log_path: Path, keep_log: bool, relays: list[Relay]) -> int:
        if self.signal_received is not None:
            self.say(f"stopped by {signal.Signals(self.signal_received).name}; the job was ended")
            _discard_log(log_path, keep_log)
            return 128 + self.signal_received
        disk_failure = self.disk.verdict(log_path, status) if self.disk is not None else None
        if disk_failure is not None:  # first: a full disk is also why a guest dies or leaves no status
            raise disk_failure
        if self.failure is not None:
            raise self.failure
        if self.stdout_broken:
            _discard_log(log_path, keep_log)
            return 128 + signal.SIGPIPE
        if status is not None:
            _discard_log(log_path, keep_log)
            lost = lost_output(relays, status)
            if lost is not None:
                raise lost
            return status
        assert self.proc is not None
        if self.timed_out:
            raise GuestDied(f"the guest did not finish within {self.deadline_s:g} s and was stopped{_panic_hint(log_path)}")
        rc = self.proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        what = self.instance.name
        raise GuestDied(f"the guest ended without reporting the job's status ({what} {how}){_panic_hint(log_path)}")


def _put_changes(channel: Channel, changes: Path, say: Say | None, automatic: bool) -> ArchiveInfo:
    """The archive's checked members, and what the agent needs besides tar, in the control directory.

    The archive is checked as it is copied: the guest gets exactly what was checked, and never the
    user's own file. repack writes it by path (exclusively), before the guest has started."""
    from apppot import snap

    try:
        info = snap.repack(str(changes), str(channel.ctl / CHANGES_ARCHIVE))
    except snap.SnapError as e:
        if automatic:  # found, not given: every later job in this directory would fail the same way
            raise UsageError(f"{e} (merged because it is in the job directory: remove or rename {changes})") from None
        raise UsageError(str(e)) from None
    channel.send(CHANGES_DELETE, "".join(path.lstrip("/") + "\n" for path in info.deleted).encode())
    channel.send(CHANGES_BASE, (info.base + "\n").encode())
    if say:
        say(f"merging {changes} (base {info.base[:16]}) before the job")
    return info


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


SEED_UID = 1000  # a cloud seed's named user when host root makes it: Debian's first ordinary user


def guest_identity(
    user: str | None,
    group: str | None,
    host_uid: int | None = None,
    host_gid: int | None = None,
    host_files: bool = True,
) -> tuple[int, int, str, str]:
    """uid, gid, user and group of the job inside: the host user's ids, or root for host root and --user root.

    Host root's job is root inside when it shares host files (start): a job user of another name would
    have root's ids all the same (the files it makes are root's on the host), so naming one is refused
    rather than silently ignored. A cloud seed (host_files=False) shares none: host root may name its user."""
    for what, name in (("user", user), ("group", group)):
        if name is not None:  # first: a malformed name is that, whoever asks (and is quoted, never echoed raw)
            check_name(name, what)
    uid = os.getuid() if host_uid is None else host_uid
    gid = os.getgid() if host_gid is None else host_gid
    if uid == 0 and not host_files and user not in (None, "root"):
        uid, gid = SEED_UID, SEED_UID
    elif uid == 0:
        for option, name in (("--user", user), ("--group", group)):
            if name not in (None, "root"):
                raise UsageError(
                    f"{option} {name!r}: apppot runs as root here, so the job runs as root inside (its files are root's "
                    f"on the host): drop {option}, or run apppot as the host user the job should be "
                    "(e.g. runuser -u USER -- apppot start ...)"
                )
    if user == "root" and group not in (None, "root"):  # root's job runs with gid 0: the group would be a lie
        raise UsageError(f"--group {group!r} with --user root: the job runs as root, in group root; drop --group")
    if user == "root" or (user is None and uid == 0):
        return 0, 0, "root", "root"
    return uid, gid, user or "user", group or ("root" if gid == 0 else "user")


def _hypervisor_env(home: Path) -> dict[str, str]:
    # slirp refuses to start without HOME. UML keeps the guest's memory in a file under TMPDIR; without
    # it UML picks /dev/shm, where AppPot's 7.x kernel was seen to fail to start its processes.
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(run_base())}

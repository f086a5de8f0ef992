"""Real UML sessions: an interactive terminal (driven through tmux), signals, dead guests, odd pipes.

Every test boots the tiny appliance from the session's cache and is bounded by explicit deadlines;
every process a test starts (tmux servers, apppot, bwrap, UML) is gone when it ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import pytest

from apppot import cpu
from tests.conftest import APPPOT

pytestmark = pytest.mark.uml

T = TypeVar("T")

BOOT_TIMEOUT_S = 60.0  # generous: a boot takes ~2 s, but the host may be busy
ROWS, COLS = 30, 100
GUEST_TERM = "xterm-256color"
DIED_MESSAGE = "the guest ended without reporting the job's status"


# --- small helpers ---------------------------------------------------------------------------


def wait_for(predicate: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.05) -> T:
    """Polls ``predicate`` until it returns something truthy; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout:g} s waiting for {detail}")
        time.sleep(interval)


def unique_id() -> str:
    return f"apppot-test-{uuid.uuid4().hex[:12]}"


def fresh_dir(path: Path) -> Path:
    path.mkdir()
    return path


def apppot_env(cache_home: Path, run_tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(cache_home), "TMPDIR": str(run_tmp), **extra}


def read_exactly(fd: int, n: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"read only {len(data)} of {n} bytes in {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                pytest.fail(f"end of file after {len(data)} of {n} bytes")
            data += chunk
    return data


def kept_log(stderr: str) -> Path:
    """The console log a failed run names on stderr (and keeps)."""
    match = re.search(r"console log kept at (\S+)\s*$", stderr)
    assert match, f"no console log named in: {stderr!r}"
    return Path(match.group(1))


# --- host processes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int  # start time in clock ticks: tells a reused pid apart
    state: str
    cmdline: str  # argv joined by blanks

    @property
    def argv0(self) -> str:
        return self.cmdline.split(" ", 1)[0]


def processes() -> dict[int, Proc]:
    found: dict[int, Proc] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        argv = cmdline.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        found[int(entry.name)] = Proc(int(entry.name), int(fields[1]), int(fields[19]), fields[0], argv)
    return found


def descendants(root: int) -> set[Proc]:
    table = processes()
    children: dict[int, list[Proc]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc)
    found: set[Proc] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child.pid)
    return found


def leftovers(tree: set[Proc], needles: Sequence[str]) -> list[Proc]:
    """Live processes that are from ``tree`` or whose command line mentions one of ``needles``."""
    now = processes()
    survivors = [p for p in tree if p.pid in now and now[p.pid].start == p.start and now[p.pid].state != "Z"]
    mentions = [p for p in now.values() if p.pid != os.getpid() and p.state != "Z" and any(n in p.cmdline for n in needles)]
    return sorted(set(survivors) | set(mentions), key=lambda p: p.pid)


def assert_all_gone(tree: set[Proc], needles: Sequence[str], settle: float = 3.0) -> None:
    wait_for(lambda: not leftovers(tree, needles), settle, lambda: f"these processes to end: {leftovers(tree, needles)}")


def uml_processes(tree: set[Proc], umid: str) -> set[Proc]:
    return {p for p in tree if f"umid={umid}" in p.cmdline and os.path.basename(p.argv0) != "bwrap"}


def uml_main(tree: set[Proc], umid: str) -> Proc:
    """The topmost UML kernel process of the guest (its parent is bwrap or apppot, not UML)."""
    uml = uml_processes(tree, umid)
    pids = {p.pid for p in uml}
    tops = [p for p in uml if p.ppid not in pids]
    assert len(tops) == 1, f"expected one UML main process, found {tops}"
    return tops[0]


# --- a job in the background -----------------------------------------------------------------


@dataclass
class Background:
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    started_flag: Path

    def wait_started(self) -> None:
        wait_for(
            lambda: self.started_flag.exists() or self.proc.poll() is not None,
            BOOT_TIMEOUT_S,
            "the job to start",
        )
        assert self.proc.poll() is None, f"apppot ended early ({self.proc.returncode}): {self.stderr()}"

    def wait(self, timeout: float) -> tuple[int, float]:
        """The exit code and how long it took to come."""
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"apppot still running after {timeout:g} s; stderr: {self.stderr()}")
        return rc, time.monotonic() - t0

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextlib.contextmanager
def background(
    args: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str],
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
) -> Iterator[Background]:
    stderr_path = cwd.parent / "apppot.stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen([APPPOT, *args], cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=err)
    try:
        yield Background(proc, stderr_path, cwd / "started")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# --- tmux ------------------------------------------------------------------------------------


@dataclass
class Tmux:
    socket: Path
    name: str

    def run(self, *args: str, check: bool = True) -> str:
        argv = ["tmux", "-S", str(self.socket), *args]
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=10).stdout

    def screen(self) -> list[str]:
        """Every line of the pane, scroll-back included, without trailing blanks."""
        out = self.run("capture-pane", "-p", "-J", "-S", "-", "-t", self.name, check=False)
        return [line.rstrip() for line in out.splitlines()]

    def dump(self) -> str:
        return "the screen:\n" + "\n".join(line for line in self.screen() if line)

    def type(self, text: str) -> None:
        self.run("send-keys", "-t", self.name, "-l", text)
        self.run("send-keys", "-t", self.name, "Enter")

    def key(self, key: str) -> None:
        self.run("send-keys", "-t", self.name, key)

    def wait_line(self, expected: str, timeout: float = 10.0) -> float:
        """Waits for a screen line equal to ``expected``; returns how long it took."""
        t0 = time.monotonic()
        wait_for(lambda: expected in self.screen(), timeout, lambda: f"the line {expected!r} on {self.dump()}")
        return time.monotonic() - t0

    def wait_prompt(self) -> None:
        def prompt() -> bool:
            lines = [line for line in self.screen() if line]
            return bool(lines) and lines[-1].endswith(("#", "$"))

        wait_for(prompt, BOOT_TIMEOUT_S, lambda: f"a shell prompt on {self.dump()}")


def pane_command(apppot_args: Sequence[str], env: dict[str, str], exit_file: Path) -> str:
    assignments = [f"{key}={value}" for key, value in env.items()]
    run = shlex.join(["env", *assignments, APPPOT, *apppot_args])
    return f"{run}; echo EXIT=$? > {shlex.quote(str(exit_file))}"


@contextlib.contextmanager
def tmux_session(socket: Path, cwd: Path, command: str, umid: str) -> Iterator[Tmux]:
    """A detached ROWSxCOLS tmux session of its own server, running ``command`` in ``cwd``."""
    tmux = Tmux(socket, f"apppot-{uuid.uuid4().hex[:8]}")
    size = ["-x", str(COLS), "-y", str(ROWS)]
    try:
        tmux.run("-f", "/dev/null", "new-session", "-d", "-s", tmux.name, *size, "-c", str(cwd), command)
        yield tmux
    finally:
        tmux.run("kill-session", "-t", tmux.name, check=False)
        tmux.run("kill-server", check=False)
        # The pane's apppot gets SIGHUP and stops its guest; wait for that, bounded.
        assert_all_gone(set(), [umid], settle=15.0)


def read_exit(exit_file: Path) -> str:
    return exit_file.read_text().strip() if exit_file.exists() else ""


# --- 1. interactive sessions -----------------------------------------------------------------


def test_interactive_shell_through_tmux(cache_home: Path, tiny_image: Path, jobdir: Path, tmp_path: Path) -> None:
    run_tmp = fresh_dir(tmp_path / "run-tmp")
    exit_file = tmp_path / "exit-status"
    umid = unique_id()
    env = {"XDG_CACHE_HOME": str(cache_home), "TMPDIR": str(run_tmp), "TERM": GUEST_TERM}
    command = pane_command(["start", "--id", umid, "--", "/bin/sh"], env, exit_file)
    with tmux_session(tmp_path / "tmux.sock", jobdir, command, umid) as tmux:
        tmux.wait_prompt()

        tmux.type("echo $((6*7))")
        tmux.wait_line("42")

        tmux.type("echo $TERM")
        tmux.wait_line(GUEST_TERM)

        tmux.type("stty size")
        tmux.wait_line(f"{ROWS} {COLS}")

        tmux.type("sleep 100")
        wait_for(lambda: any(line.endswith(" sleep 100") for line in tmux.screen()), 10, "the echo of 'sleep 100'")
        time.sleep(1.0)  # let the shell start sleep and wait for it
        tmux.key("C-c")
        tmux.type("echo after-ctrl-c")
        took = tmux.wait_line("after-ctrl-c", timeout=5)
        assert took < 5

        tmux.type("exit 5")
        wait_for(lambda: read_exit(exit_file), 15, lambda: f"apppot to end; {tmux.dump()}")
    assert read_exit(exit_file) == "EXIT=5"
    assert list(run_tmp.iterdir()) == []


def test_no_command_on_a_terminal_falls_back_to_a_shell(cache_home: Path, tiny_image: Path, jobdir: Path, tmp_path: Path) -> None:
    exit_file = tmp_path / "exit-status"
    umid = unique_id()
    env = {"XDG_CACHE_HOME": str(cache_home), "TMPDIR": str(fresh_dir(tmp_path / "run-tmp")), "TERM": GUEST_TERM}
    with tmux_session(tmp_path / "tmux.sock", jobdir, pane_command(["start", "--id", umid], env, exit_file), umid) as tmux:
        tmux.wait_prompt()
        tmux.type("echo fallback-ok")
        tmux.wait_line("fallback-ok")
        tmux.type("exit 0")
        wait_for(lambda: read_exit(exit_file), 15, lambda: f"apppot to end; {tmux.dump()}")
    assert read_exit(exit_file) == "EXIT=0"


# --- 2. signals and cleanup ------------------------------------------------------------------

SLEEPING_JOB = ["sh", "-c", "touch started; sleep 100"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_guest_and_cleans_up(
    signum: signal.Signals, cache_home: Path, tiny_image: Path, jobdir: Path, tmp_path: Path
) -> None:
    run_tmp = fresh_dir(tmp_path / "run-tmp")
    umid = unique_id()
    env = apppot_env(cache_home, run_tmp)
    with background(["start", "--id", umid, "--", *SLEEPING_JOB], cwd=jobdir, env=env) as job:
        job.wait_started()
        tree = descendants(job.proc.pid)
        assert uml_processes(tree, umid), f"no UML process among apppot's descendants: {tree}"
        assert list(run_tmp.iterdir()), "the run directory should live in TMPDIR while the job runs"

        job.proc.send_signal(signum)
        rc, took = job.wait(timeout=10)
    assert rc == 128 + signum, job.stderr()
    assert took < 10
    assert f"stopped by {signum.name}" in job.stderr()
    assert list(run_tmp.iterdir()) == []
    assert_all_gone(tree, [umid, str(jobdir), str(run_tmp)])


@pytest.mark.parametrize("bwrap", [None, "/nonexistent/bwrap"], ids=["sandboxed", "without-bubblewrap"])
def test_a_killed_apppot_leaves_no_guest_behind(
    bwrap: str | None, request: pytest.FixtureRequest, cache_home: Path, tiny_image: Path, jobdir: Path, tmp_path: Path
) -> None:
    """SIGKILL cannot be caught: bubblewrap's --die-with-parent, or without it the parent-death signal
    AppPot asks for, ends UML and its helpers."""
    if bwrap and request.node.callspec.params["uml_kernel"] == "debian-kernel":
        # Known: Debian's 6.1 UML leaves two of its helper processes behind when its main process is ended
        # by a signal; AppPot's own kernel does not, and bubblewrap ends them all.
        pytest.skip("without bubblewrap only AppPot's kernel ends all its helpers when AppPot is killed")
    umid = unique_id()
    env = apppot_env(cache_home, fresh_dir(tmp_path / "run-tmp"), **({"APPPOT_BWRAP": bwrap} if bwrap else {}))
    with background(["start", "--id", umid, "--", *SLEEPING_JOB], cwd=jobdir, env=env) as job:
        job.wait_started()
        tree = descendants(job.proc.pid)
        assert uml_processes(tree, umid), f"no UML process among apppot's descendants: {tree}"
        job.proc.kill()
        job.wait(timeout=10)
    assert_all_gone(tree, [umid, str(jobdir)], settle=10)


def allowed_cpus(pid: int) -> set[str]:
    """The CPU lists of all threads of a process, as /proc shows them."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            status = (task / "status").read_text()
            lists.add(next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list:")))
    return lists


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs a choice of CPUs")
def test_the_guest_is_pinned_to_one_host_cpu_and_apppot_is_not(
    cache_home: Path, tiny_image: Path, jobdir: Path, tmp_path: Path
) -> None:
    everywhere = {cpu.format_cpus(os.sched_getaffinity(0))}
    last = str(max(os.sched_getaffinity(0)))
    for option, expected in ((last, {last}), ("all", everywhere)):
        umid = unique_id()
        env = apppot_env(cache_home, fresh_dir(tmp_path / f"run-tmp-{option}"))
        with background(["start", "--cpu", option, "--id", umid, "--", *SLEEPING_JOB], cwd=jobdir, env=env) as job:
            job.wait_started()
            main = uml_main(descendants(job.proc.pid), umid)
            uml = {main, *descendants(main.pid)}
            assert len(uml) >= 2, f"expected UML's kernel and the job's processes: {uml}"
            for proc in uml:
                assert allowed_cpus(proc.pid) == expected, f"--cpu {option}: {proc}"
            # apppot's relays and supervisor keep all CPUs
            assert allowed_cpus(job.proc.pid) == everywhere
        (jobdir / "started").unlink()


# --- 3. the guest dies without reporting a status --------------------------------------------


def test_killed_uml_exits_122(cache_home: Path, tiny_image: Path, jobdir: Path, tmp_path: Path) -> None:
    run_tmp = fresh_dir(tmp_path / "run-tmp")
    umid = unique_id()
    with background(["start", "--id", umid, "--", *SLEEPING_JOB], cwd=jobdir, env=apppot_env(cache_home, run_tmp)) as job:
        job.wait_started()
        tree = descendants(job.proc.pid)
        os.kill(uml_main(tree, umid).pid, signal.SIGKILL)
        rc, took = job.wait(timeout=10)
    stderr = job.stderr()
    assert rc == 122, stderr
    assert took < 10
    assert DIED_MESSAGE in stderr
    log = kept_log(stderr)
    assert log.is_file()
    log.unlink()
    assert list(run_tmp.iterdir()) == []
    assert_all_gone(tree, [umid, str(jobdir), str(run_tmp)])


def test_kernel_panic_exits_122(cache_home: Path, tiny_image: Path, jobdir: Path, tmp_path: Path) -> None:
    run_tmp = fresh_dir(tmp_path / "run-tmp")
    args = ["start", "--user", "root", "--id", unique_id(), "--", "sh", "-c", "echo c > /proc/sysrq-trigger"]
    result = subprocess.run(
        [APPPOT, *args],
        cwd=jobdir,
        env=apppot_env(cache_home, run_tmp),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=BOOT_TIMEOUT_S,
        check=False,
    )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 122, stderr
    assert DIED_MESSAGE in stderr
    assert "Kernel panic" in stderr
    kept_log(stderr).unlink()
    assert list(run_tmp.iterdir()) == []


# --- 4. and 5. pipes -------------------------------------------------------------------------


def test_open_but_unused_stdin_does_not_hang(cache_home: Path, tiny_image: Path, jobdir: Path, tmp_path: Path) -> None:
    run_tmp = fresh_dir(tmp_path / "run-tmp")
    env = apppot_env(cache_home, run_tmp)
    with background(["start", "--", "true"], cwd=jobdir, env=env, stdin=subprocess.PIPE) as job:
        rc, _ = job.wait(timeout=15)  # stdin stays open and empty until the end
    assert rc == 0, job.stderr()
    assert list(run_tmp.iterdir()) == []


def test_closed_stdout_ends_with_sigpipe_status(cache_home: Path, tiny_image: Path, jobdir: Path, tmp_path: Path) -> None:
    run_tmp = fresh_dir(tmp_path / "run-tmp")
    env = apppot_env(cache_home, run_tmp)
    with background(["start", "--", "yes"], cwd=jobdir, env=env, stdout=subprocess.PIPE) as job:
        assert job.proc.stdout is not None
        data = read_exactly(job.proc.stdout.fileno(), 1000, timeout=BOOT_TIMEOUT_S)
        job.proc.stdout.close()
        rc, _ = job.wait(timeout=15)
    assert data == b"y\n" * 500
    assert rc == 128 + signal.SIGPIPE, job.stderr()
    assert list(run_tmp.iterdir()) == []

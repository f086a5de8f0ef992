"""The job's output streams under faults, with real boots: every byte arrives, or AppPot exits 125
with one line naming the stream, the error and the job's own status.

Each test shapes the host's descriptors with a shell wrapped around `apppot` (the fixture's prefix),
so the same test runs as root and as the unprivileged test user.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import chown_to
from tests.integration.conftest import own_kernel_only

pytestmark = pytest.mark.uml

uml_kernel = own_kernel_only  # the kernel matrix is test_start's

ALTERNATING = 'i=0; while [ $i -lt 500 ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done'


CLOSED = "Bad file descriptor, closed when apppot started"


def wrapped(script: str) -> list[str]:
    """A bash around the apppot command line ("$@"), which exits with apppot's status."""
    return ["bash", "-c", f"{script}; exit ${{PIPESTATUS[0]}}", "bash"]


@pytest.fixture(params=["root", "user"])
def who(request: pytest.FixtureRequest) -> str | None:
    """Who runs apppot: root, or the unprivileged test user."""
    if request.param == "root":
        return None
    user: str = request.getfixturevalue("test_user")
    return user


@pytest.fixture
def job(tmp_path: Path, who: str | None) -> Path:
    d = tmp_path / "faultjob"
    d.mkdir()
    if who is not None:
        chown_to(d, who)
    return d


def one_line_no_traceback(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_slow_reader_gets_every_byte_and_the_jobs_status(apppot, job: Path, who: str | None) -> None:
    # The reader takes one byte, then nothing for 8 s: longer than any grace AppPot could allow itself.
    slow = wrapped('"$@" | (head -c1 >/dev/null; sleep 8; wc -c)')
    r = apppot(["start", "--", "sh", "-c", "head -c 130000 /dev/zero; exit 3"], cwd=job, prefix=slow, as_user=who)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (3, b"129999", b"")


def test_a_non_blocking_stdout_is_waited_out(apppot, job: Path, who: str | None) -> None:
    nonblocking = 'python3 -c "import os, sys; os.set_blocking(1, False); os.execvp(sys.argv[1], sys.argv[1:])"'
    script = wrapped(f'{nonblocking} "$@" | (sleep 2; wc -c)')
    r = apppot(["start", "--", "sh", "-c", "head -c 1000000 /dev/zero"], cwd=job, prefix=script, as_user=who)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, b"1000000", b"")


@pytest.mark.parametrize("code", [0, 4])
def test_stdout_on_dev_full_is_exit_125_naming_stdout_and_the_jobs_status(apppot, job: Path, who: str | None, code: int) -> None:
    r = apppot(["start", "--", "sh", "-c", f"echo hi; exit {code}"], cwd=job, prefix=wrapped('"$@" >/dev/full'), as_user=who)
    assert r.returncode == 125
    line = one_line_no_traceback(r.err)
    assert line == f"apppot: error: cannot write the job's stdout: No space left on device (the job itself exited with {code})"


def test_stderr_on_dev_full_is_exit_125_and_stdout_still_arrives(apppot, job: Path, who: str | None) -> None:
    r = apppot(["start", "--", "sh", "-c", "echo out; echo err >&2"], cwd=job, prefix=wrapped('"$@" 2>/dev/full'), as_user=who)
    assert (r.returncode, r.stdout) == (125, b"out\n")


def test_a_full_filesystem_as_stdout(apppot, job: Path, who: str | None, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=1777", "tmpfs", str(small)], check=True)
    try:
        script = wrapped(f'"$@" >{small}/out.bin')
        r = apppot(["start", "--", "sh", "-c", "head -c 2000000 /dev/zero"], cwd=job, prefix=script, as_user=who)
        assert r.returncode == 125
        line = one_line_no_traceback(r.err)
        assert line == "apppot: error: cannot write the job's stdout: No space left on device (the job itself exited with 0)"
        assert 0 < (small / "out.bin").stat().st_size <= 1 << 20
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize(
    ("closing", "job_script", "code", "stdout", "message"),
    [
        (">&-", "echo hi; exit 5", 125, b"", f"stdout: {CLOSED} (the job itself exited with 5)"),
        (">&-", "exit 5", 5, b"", None),
        ("<&-", "wc -c; exit 6", 6, b"0\n", None),  # a closed stdin reads empty
        ("2>&-", "echo out; exit 7", 7, b"out\n", None),
        ("2>&-", "echo out; echo err >&2", 125, b"out\n", None),  # the message cannot be told: stderr is closed
        (">&- 2>&-", "exit 8", 8, b"", None),
    ],
)
def test_closed_descriptors_at_start(
    apppot, job: Path, who: str | None, closing: str, job_script: str, code: int, stdout: bytes, message: str | None
) -> None:
    # Closed descriptors as the shell left them; the fixture's own stdin is /dev/null, so `<&-` is closing it.
    r = apppot(["start", "--", "sh", "-c", job_script], cwd=job, prefix=wrapped(f'"$@" {closing}'), as_user=who)
    assert (r.returncode, r.stdout) == (code, stdout), r.err
    if message is not None:
        assert one_line_no_traceback(r.err) == f"apppot: error: cannot write the job's {message}"
    else:
        assert r.stderr == b""


def native_order() -> bytes:
    return subprocess.run(["sh", "-c", ALTERNATING], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True).stdout


@pytest.mark.parametrize("target", ["file", "pipe"])
def test_stdout_and_stderr_as_one_file_keep_their_order(apppot, job: Path, who: str | None, target: str) -> None:
    expected = native_order()
    assert expected.count(b"\n") == 1000
    if target == "file":
        log = job / "log"
        r = apppot(["start", "--", "sh", "-c", ALTERNATING], cwd=job, prefix=wrapped(f'"$@" >{log} 2>&1'), as_user=who)
        assert (r.returncode, log.read_bytes()) == (0, expected)
    else:
        r = apppot(["start", "--", "sh", "-c", ALTERNATING], cwd=job, prefix=wrapped('"$@" 2>&1 | cat'), as_user=who)
        assert (r.returncode, r.stdout) == (0, expected)


@pytest.mark.parametrize(
    ("redirection", "seen"),
    [("", "apart"), ('>"$LOG" 2>&1', "joined"), ("2>&1 | cat", "joined"), ('>"$LOG" 2>"$LOG"', "apart")],
)
def test_the_job_shares_one_channel_only_where_the_host_has_one_open_file(apppot, job: Path, redirection: str, seen: str) -> None:
    # `>log 2>log` opens the file twice, each with its own offset: natively two streams, and so inside.
    log = job / "log"
    probe = "if [ /proc/self/fd/1 -ef /proc/self/fd/2 ]; then echo joined; else echo apart; fi"
    r = apppot(["start", "--", "sh", "-c", probe], cwd=job, prefix=wrapped(f'"$@" {redirection}'), env={"LOG": str(log)})
    assert r.returncode == 0, r.err
    assert (log.read_bytes() if "LOG" in redirection and "|" not in redirection else r.stdout) == f"{seen}\n".encode()


@pytest.mark.qemu
@pytest.mark.parametrize("backend", ["qemu"], indirect=True)
def test_qemu_keeps_the_order_and_reports_a_full_stdout(apppot, jobdir: Path, backend: str) -> None:
    log = jobdir / "log"
    r = apppot(["start", "--", "sh", "-c", ALTERNATING], cwd=jobdir, prefix=wrapped(f'"$@" >{log} 2>&1'), timeout=300)
    assert (r.returncode, log.read_bytes()) == (0, native_order())
    r = apppot(["start", "--", "sh", "-c", "echo hi; exit 2"], cwd=jobdir, prefix=wrapped('"$@" >/dev/full'), timeout=300)
    assert r.returncode == 125
    assert one_line_no_traceback(r.err).endswith("stdout: No space left on device (the job itself exited with 2)")

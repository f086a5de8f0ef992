"""Defects a review found in the job's streams and disk checks, each shown failing before its fix:
what a job leaves in its directory, its command line on the console, a stdin open only for writing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import chown_to
from tests.integration.conftest import own_kernel_only

pytestmark = pytest.mark.uml

uml_kernel = own_kernel_only

# Generous: a boot takes about a second here; more than this is a hang.
BOUND_S = 30


def wrapped(script: str) -> list[str]:
    """A bash around the apppot command line ("$@"), which exits with apppot's status."""
    return ["bash", "-c", f"{script}; exit ${{PIPESTATUS[0]}}", "bash"]


@pytest.fixture
def job(tmp_path: Path, test_user: str) -> Path:
    d = tmp_path / "reviewjob"
    d.mkdir()
    chown_to(d, test_user)
    return d


def test_a_console_log_the_job_turned_into_a_fifo_is_refused_not_a_hang(apppot, job: Path, test_user: str) -> None:
    # A job may write its own --console-log when it is in the job directory: a FIFO without a reader
    # must not block the next run (it is opened non-blocking and refused).
    plant = ["start", "--console-log", "con.log", "--", "sh", "-c", "rm -f con.log; mkfifo con.log"]
    first = apppot(plant, cwd=job, as_user=test_user)
    assert first.returncode == 0, first.err
    try:
        r = apppot(["start", "--console-log", "con.log", "--", "echo", "next"], cwd=job, as_user=test_user, timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"apppot start hung for {BOUND_S} s opening a --console-log the previous job made a FIFO")
    assert r.returncode == 125, r.err
    assert "con.log" in r.err and "Traceback" not in r.err, r.err


def test_a_command_named_like_a_disk_error_is_not_a_full_disk(apppot, job: Path, test_user: str) -> None:
    # The agent logs "running: $1" on the console: a job's own text must not pass for the kernel's
    # block-layer line ("the guest could not write its disk", 125). Natively: command not found, 127.
    r = apppot(["start", "--", "error, dev ubda"], cwd=job, as_user=test_user)
    assert "could not write its disk" not in r.err, r.err
    assert r.returncode == 127, r.err


def test_a_write_only_stdin_does_not_fail_a_job_that_never_reads_it(apppot, job: Path, test_user: str, tmp_path: Path) -> None:
    # `0>>file`: stdin is a regular file open for writing only; `echo` never reads it, and natively
    # prints hi and exits 0 (it was 125, "cannot pass stdin to the guest").
    target = tmp_path / "write-only"
    target.write_bytes(b"some bytes\n")
    chown_to(target, test_user)
    r = apppot(["start", "--", "echo", "hi"], cwd=job, as_user=test_user, prefix=wrapped(f'"$@" 0>>{target}'))
    assert (r.returncode, r.stdout) == (0, b"hi\n"), r.err


def test_a_background_job_on_a_terminal_is_not_stopped_for_stdin_it_never_reads(apppot, job: Path) -> None:
    # `apppot start -- echo hi > out &` in a shell with job control, stdin the terminal: AppPot read the
    # terminal from the background and was stopped (SIGTTIN) for good; natively echo runs and ends.
    out = job / "out"
    shell = f'set -m; "$@" > {out} & wait $!; echo "status $?"'
    inner = ["bash", "-c", shell, "bash"]
    prefix = ["bash", "-c", 'exec script -qec "$(printf "%q " "$@")" /dev/null', "bash", *inner]
    r = apppot(["start", "--", "echo", "hi"], cwd=job, prefix=prefix, timeout=BOUND_S)
    assert b"status 0" in r.stdout, (r.stdout, r.err)
    assert out.read_bytes() == b"hi\n"

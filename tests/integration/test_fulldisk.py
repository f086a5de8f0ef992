"""Full disks and shared COW files, with real boots: small filesystems mounted for the test (as root).

A COW (or QEMU overlay) that fills its filesystem must fail the job with one line naming the
filesystem, whatever the job's own status, and lose nothing already in the job directory; too little
free space is refused before the boot; of several jobs started at once on one --cow, exactly one runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.conftest import BOTH_BACKENDS, own_kernel_only

pytestmark = pytest.mark.uml

uml_kernel = own_kernel_only  # the kernel matrix is test_start's

# More than any small filesystem below holds; the job's own status is 0 all the same.
FILL_JOB = "cp input.dat copy1.dat && dd if=/dev/zero of=/big bs=1M count=40 2>/dev/null; sync; cp input.dat copy2.dat; exit 0"


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the test, open to every user."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (make test runs as root in CI)")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def fill_the_disk(apppot, jobdir: Path, small: Path, options: list[str], env: dict[str, str], job: str = FILL_JOB) -> str:
    """Run a job that writes more to its disk than ``small`` holds: AppPot's one line, after checking that it
    fails the job naming ``small`` as full, and that the job directory kept what the job wrote there."""
    data = os.urandom(3 << 20)
    (jobdir / "input.dat").write_bytes(data)
    r = apppot(["start", *options, "--", "sh", "-c", job], cwd=jobdir, env={"APPPOT_MIN_FREE": "4M", **env})
    line = one_line(r.err)
    assert r.returncode == 125 and f"filesystem {small} " in line and "full" in line, line
    for name in ("copy1.dat", "copy2.dat") if job == FILL_JOB else ("copy1.dat",):
        assert (jobdir / name).read_bytes() == data, name
    return line


@BOTH_BACKENDS
def test_a_cow_that_fills_its_filesystem_fails_the_job_and_keeps_the_job_directory(
    apppot, backend: str, jobdir: Path, tmp_path: Path
) -> None:
    with small_fs(tmp_path / "small", "20m") as small:
        cow = small / ("mine.qcow2" if backend == "qemu" else "mine.cow")
        line = fill_the_disk(apppot, jobdir, small, ["--cow", str(cow)], {})
        assert str(cow) in line and "job's own status was 0" in line, line


@BOTH_BACKENDS
def test_a_temporary_cow_that_fills_tmpdir_fails_the_job_with_the_cause(
    apppot, backend: str, jobdir: Path, tmp_path: Path
) -> None:
    with small_fs(tmp_path / "small-tmp", "30m") as small:
        fill_the_disk(apppot, jobdir, small, [], {"TMPDIR": str(small)})


def test_a_guest_that_panics_on_its_full_disk_is_told_apart_from_a_bare_crash(apppot, jobdir: Path, tmp_path: Path) -> None:
    with small_fs(tmp_path / "small", "20m") as small:
        # Once the journal is aborted, the next change to the root filesystem is an ext4 error: a panic here.
        job = FILL_JOB.replace("exit 0", "touch /after; sync; exit 0")
        options = ["--extra", "rootflags=errors=panic", "--cow", str(small / "mine.cow")]
        line = fill_the_disk(apppot, jobdir, small, options, {}, job)
        assert "the guest reported no status" in line, line


@BOTH_BACKENDS
def test_too_little_free_space_is_refused_before_the_boot(apppot, backend: str, jobdir: Path, tmp_path: Path) -> None:
    with small_fs(tmp_path / "tiny-fs", "10m") as small:
        cow = small / ("mine.qcow2" if backend == "qemu" else "mine.cow")
        r = apppot(["start", "--cow", str(cow), "--", "true"], cwd=jobdir)
        line = one_line(r.err)
        assert r.returncode == 125 and f"filesystem {small} " in line and "free" in line and "APPPOT_MIN_FREE" in line, line
        assert not cow.exists()
        r = apppot(["start", "--", "true"], cwd=jobdir, env={"TMPDIR": str(small)})
        line = one_line(r.err)
        assert r.returncode == 125 and f"filesystem {small} " in line and "TMPDIR" in line, line
        # Lowered on purpose, the same job runs.
        r = apppot(["start", "--cow", str(cow), "--", "true"], cwd=jobdir, env={"APPPOT_MIN_FREE": "2M"})
        assert r.returncode == 0, r.err


@BOTH_BACKENDS
def test_of_several_jobs_started_together_on_one_cow_exactly_one_runs(apppot, backend: str, jobdir: Path, tmp_path: Path) -> None:
    jobs = 3 if backend == "qemu" else 4
    for attempt in range(10):
        cow = tmp_path / f"shared-{attempt // 2}.{'qcow2' if backend == 'qemu' else 'cow'}"  # new, then existing
        argv = ["start", "--cow", str(cow), "--", "sh", "-c", "sleep 4; exit 3"]  # outlasts the others' start
        with ThreadPoolExecutor(jobs) as pool:
            runs = [future.result() for future in [pool.submit(apppot, argv, cwd=jobdir) for _ in range(jobs)]]
        codes = sorted(r.returncode for r in runs)
        assert codes == [3] + [125] * (jobs - 1), (attempt, [(r.returncode, r.err) for r in runs])
        for r in runs:
            if r.returncode == 125:
                assert "in use" in one_line(r.err), r.err

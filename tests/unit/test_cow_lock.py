"""One --cow, one job: the lock AppPot holds on a COW while the job runs, and how it meets UML's own lock."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from apppot import cow
from apppot.errors import CowError

# What UML does with its COW as it boots: a POSIX write lock on the whole file (os_lock_file).
UML_LOCK = (
    "import fcntl, sys; f = open(sys.argv[1], 'r+b'); fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('locked', flush=True)"
)
HOLD_UML_LOCK = UML_LOCK + "; import time; time.sleep(30)"


def slow_fill(fd: int, _path: Path) -> None:
    time.sleep(0.05)  # widens the window in which other jobs look for the file
    os.write(fd, b"whole cow")


def test_a_second_job_on_a_held_cow_is_told_it_is_in_use(tmp_path: Path) -> None:
    path = tmp_path / "mine.cow"
    first = cow.hold(path, slow_fill, "ext4")
    with pytest.raises(CowError, match="is in use by another running job"):
        cow.hold(path, slow_fill, "ext4")
    os.close(first)
    os.close(cow.hold(path, slow_fill, "ext4"))  # once the job ended, the next may have it
    assert path.read_bytes() == b"whole cow"


def test_the_hold_leaves_umls_own_lock_free_and_the_check_takes_none(tmp_path: Path) -> None:
    path = tmp_path / "mine.cow"
    held = cow.hold(path, slow_fill, "ext4")
    try:
        uml = subprocess.run([sys.executable, "-c", UML_LOCK, str(path)], capture_output=True, text=True, check=False)
        assert uml.stdout == "locked\n", uml.stderr  # flock(2) and POSIX locks are independent on local filesystems
    finally:
        os.close(held)
    # While "UML" holds its lock, the check refuses the COW, and only asks: the lock stays UML's.
    uml_proc = subprocess.Popen([sys.executable, "-c", HOLD_UML_LOCK, str(path)], stdout=subprocess.PIPE)
    try:
        assert uml_proc.stdout is not None and uml_proc.stdout.readline() == b"locked\n"
        with pytest.raises(CowError, match="is in use by another running job"):
            cow.check_unlocked(path)
    finally:
        uml_proc.kill()
        uml_proc.wait()
    cow.check_unlocked(path)


def race(path: Path, jobs: int = 4) -> list[int | str]:
    """Each of ``jobs`` threads holds ``path`` at once: the descriptor, or the refusal."""
    results: list[int | str] = []
    start = threading.Barrier(jobs)

    def job() -> None:
        start.wait()
        try:
            results.append(cow.hold(path, slow_fill, "ext4"))
        except CowError as e:
            results.append(str(e))

    threads = [threading.Thread(target=job) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("existing", [False, True])
def test_of_jobs_racing_for_one_cow_exactly_one_holds_it(tmp_path: Path, existing: bool) -> None:
    for attempt in range(20):
        path = tmp_path / f"race-{attempt}.cow"
        if existing:
            path.write_bytes(b"whole cow")
        results = race(path)
        held = [r for r in results if isinstance(r, int)]
        refused = [r for r in results if isinstance(r, str)]
        assert len(held) == 1 and all("is in use by another running job" in r for r in refused), results
        os.close(held[0])
        assert path.read_bytes() == b"whole cow"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no half-made COW left


def test_links_and_special_files_are_refused_without_hanging(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    (tmp_path / "link.cow").symlink_to(target)
    with pytest.raises(CowError, match="symbolic link"):
        cow.hold(tmp_path / "link.cow", slow_fill, "ext4")
    os.mkfifo(tmp_path / "fifo.cow")
    with pytest.raises(CowError, match="not a regular file"):
        cow.hold(tmp_path / "fifo.cow", slow_fill, "ext4")
    assert target.read_bytes() == b"precious"


def test_on_nfs_the_hold_leaves_locking_to_uml(tmp_path: Path) -> None:
    # There flock(2) is a POSIX lock on the server and would keep UML from locking its COW.
    path = tmp_path / "mine.cow"
    first = cow.hold(path, slow_fill, "nfs4")
    second = cow.hold(path, slow_fill, "nfs4")
    for fd in (first, second):
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.close(fd)

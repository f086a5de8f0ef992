"""Job directories that would hand the guest more than the job's own files are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apppot import jobdir
from apppot.cli import parse_start
from apppot.errors import JobDirError
from apppot.images.store import cache_dir
from apppot.jobdir import check_jobdir, check_not_in_cache, check_outside


@pytest.mark.parametrize("path", ["/", "/etc", "/usr/lib", "/tmp", "/home", "/var"])
def test_the_root_and_system_directories_are_refused(path: str) -> None:
    with pytest.raises(JobDirError, match="--unsafe-jobdir"):
        check_jobdir(Path(path))


def test_the_whole_home_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobdir, "_passwd_home", lambda: str(tmp_path))
    with pytest.raises(JobDirError, match="your whole home directory"):
        check_jobdir(tmp_path)
    (tmp_path / "job").mkdir()
    assert check_jobdir(tmp_path / "job") == (tmp_path / "job").resolve()


def test_the_flag_accepts_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobdir, "_passwd_home", lambda: str(tmp_path))
    assert check_jobdir(tmp_path, unsafe_ok=True) == tmp_path.resolve()


def test_a_link_to_a_system_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "etc").symlink_to("/etc")
    with pytest.raises(JobDirError, match="/etc is a system directory"):
        check_jobdir(tmp_path / "etc")


def test_a_deleted_current_directory_is_one_line(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    with pytest.raises(JobDirError, match="does not exist"):
        check_jobdir(gone / "nothing")


def test_what_the_host_reads_may_not_be_inside(tmp_path: Path) -> None:
    inside = tmp_path / "cache" / "apppot"
    with pytest.raises(JobDirError, match="inside the job directory"):
        check_outside(tmp_path, inside, "AppPot's cache", "fix")
    with pytest.raises(JobDirError):
        check_outside(tmp_path, tmp_path, "TMPDIR", "fix")
    check_outside(tmp_path / "job", tmp_path / "cache", "AppPot's cache", "fix")  # beside it: fine


def test_a_relative_cache_home_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert cache_dir() == tmp_path / ".cache" / "apppot"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
    assert cache_dir() == tmp_path / "abs" / "apppot"
    assert os.path.isabs(cache_dir())


def test_a_directory_holding_the_home_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobdir, "_passwd_home", lambda: str(tmp_path / "users" / "me"))
    (tmp_path / "users" / "me").mkdir(parents=True)
    with pytest.raises(JobDirError, match="holding your home directory"):
        check_jobdir(tmp_path / "users")
    assert check_jobdir(tmp_path / "users", unsafe_ok=True) == (tmp_path / "users").resolve()


def test_a_job_directory_inside_the_cache_is_refused_but_a_submitted_jobs(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "apppot"
    with pytest.raises(JobDirError, match="inside AppPot's cache"):
        check_not_in_cache(cache / "host", cache)
    with pytest.raises(JobDirError):
        check_not_in_cache(cache / "jobs", cache)
    check_not_in_cache(cache / "jobs" / "slurm-1" / "job", cache)
    check_not_in_cache(tmp_path / "job", cache)


def test_the_deleted_current_directory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(JobDirError, match="current directory cannot be used"):
        parse_start(["--", "true"])


def test_a_home_the_batch_system_set_to_the_job_directory_is_fine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ARC runs a job with HOME set to its session directory, which is the job directory.
    monkeypatch.setattr(jobdir, "_passwd_home", lambda: "/home/someone-else-entirely")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_jobdir(tmp_path) == tmp_path.resolve()

"""`apppot submit` and `apppot fetch` against hostile jobs and hostile names, end to end through the CLI.

A job may leave anything in its staged job directory (links to the user's files, FIFOs, huge files);
names given to `apppot submit` may carry newlines, '#', '%', quotes or bytes that are not UTF-8.
Slurm's and ARC's client tools are stand-ins here (a script that records what it was handed); the
real ones run in tests/integration/test_slurm.py and test_arc.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from apppot.cli import main
from tests.conftest import open_to_all
from tests.unit.test_results import unprivileged

NOT_UTF8 = os.fsdecode(b"caf\xe9")  # Latin-1 bytes, as a shell hands them to Python


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user: an XDG cache, a working directory, an image, and a stand-in sbatch that keeps the script."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "app.img").write_bytes(b"\0" * 4096)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text('#!/bin/sh\nfor script; do :; done\ncp "$script" "$SBATCH_KEEP"\necho 42\nexit "${SBATCH_EXIT:-0}"\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_KEEP", str(tmp_path / "submitted.sh"))
    return tmp_path


def staged(home: Path) -> list[Path]:
    jobs = home / "cache" / "apppot" / "jobs"
    return sorted(jobs.iterdir()) if jobs.exists() else []


def fake_slurm_job(home: Path, outputs: list[str]) -> Path:
    """A submitted (and finished) Slurm job's staging directory and record, as `apppot submit` leaves it."""
    stage = home / "cache" / "apppot" / "jobs" / "20250101-000000-abcd"
    (stage / "job").mkdir(parents=True)
    (stage / "stdout.txt").write_text("out\n")
    (stage / "stderr.txt").write_text("")
    record = {
        "job_id": "slurm-7",
        "target": "slurm",
        "native_id": "7",
        "name": "apppot",
        "stage": str(stage),
        "outputs": outputs,
        "submitted": "2025-01-01T00:00:00Z",
    }
    (stage / "record.json").write_text(json.dumps(record))
    return stage / "job"


# --- fetch: what the job left is never followed --------------------------------------------------


def test_fetch_does_not_follow_a_link_the_job_left(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = home / "secret"
    secret.write_text("the user's private key\n")
    job = fake_slurm_job(home, ["result.txt"])
    (job / "result.txt").symlink_to(secret)
    code = main(["fetch", "slurm-7"])
    err = capsys.readouterr().err
    assert code == 125
    assert "result.txt" in err and "symbolic link" in err
    fetched = home / "work" / "slurm-7"
    assert not (fetched / "result.txt").exists() and not (fetched / "result.txt").is_symlink()
    assert (fetched / "stdout.txt").read_text() == "out\n"  # what is safe still comes


def test_fetch_brings_the_jobs_record_beside_its_streams(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = fake_slurm_job(home, ["result.txt"])
    (job / "result.txt").write_text("r\n")
    (job.parent / "apppot-record.json").write_text('{"schema": "apppot-record/1"}\n')
    (job / "apppot-record.json").write_text("the job's own, not the record\n")
    assert main(["fetch", "slurm-7"]) == 0, capsys.readouterr().err
    fetched = home / "work" / "slurm-7"
    assert (fetched / "apppot-record.json").read_text() == '{"schema": "apppot-record/1"}\n'
    assert sorted(p.name for p in fetched.iterdir()) == ["apppot-record.json", "result.txt", "stderr.txt", "stdout.txt"]


def test_fetch_refuses_a_record_that_is_a_link(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = fake_slurm_job(home, [])
    (job.parent / "apppot-record.json").symlink_to(home / "secret")
    assert main(["fetch", "slurm-7"]) == 125
    assert "apppot-record.json" in capsys.readouterr().err


def test_fetch_does_not_follow_a_linked_directory(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "private").mkdir()
    (home / "private" / "result.txt").write_text("private\n")
    job = fake_slurm_job(home, ["sub/result.txt"])
    (job / "sub").symlink_to(home / "private")
    assert main(["fetch", "slurm-7"]) == 125
    assert "sub/result.txt" in capsys.readouterr().err
    assert not (home / "work" / "slurm-7" / "sub" / "result.txt").exists()


def test_fetch_refuses_a_fifo_without_hanging(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = fake_slurm_job(home, ["result.txt"])
    os.mkfifo(job / "result.txt")
    assert main(["fetch", "slurm-7"]) == 125
    assert "FIFO" in capsys.readouterr().err


def test_fetch_leaves_a_users_existing_directory_alone(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = fake_slurm_job(home, ["result.txt"])
    (job / "result.txt").write_text("new\n")
    mine = home / "work" / "slurm-7"
    mine.mkdir()
    (mine / "result.txt").write_text("the user's own\n")
    assert main(["fetch", "slurm-7"]) == 125
    assert "exists" in capsys.readouterr().err
    assert (mine / "result.txt").read_text() == "the user's own\n"


def test_fetch_force_replaces_a_link_in_the_users_directory_not_its_target(home: Path) -> None:
    job = fake_slurm_job(home, ["result.txt"])
    (job / "result.txt").write_text("new\n")
    elsewhere = home / "elsewhere.txt"
    elsewhere.write_text("keep me\n")
    mine = home / "work" / "slurm-7"
    mine.mkdir()
    (mine / "result.txt").symlink_to(elsewhere)
    assert main(["fetch", "--force", "slurm-7"]) == 0
    assert elsewhere.read_text() == "keep me\n"
    assert not (mine / "result.txt").is_symlink() and (mine / "result.txt").read_text() == "new\n"


# --- submit: names cannot reach the batch script ---------------------------------------------------


def test_a_job_name_cannot_inject_a_shell_line(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "submit",
            "--to",
            "slurm",
            "--dry-run",
            "--image",
            str(home / "app.img"),
            "--name",
            "x\ntouch /tmp/INJECTED #",
            "--",
            "true",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 125 and "touch" not in out
    assert err.startswith("apppot: error: invalid --name") and err.count("\n") == 1


def test_arc_inputs_cannot_take_apppots_own_names(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "work" / "apppot-job.sh").write_text("echo mine\n")
    code = main(["submit", "--to", "arc", "--dry-run", "--input", "apppot-job.sh", "--", "true"])
    err = capsys.readouterr().err
    assert code == 125 and "apppot-job.sh" in err and err.count("\n") == 1


def test_outputs_cannot_take_the_names_of_stdout_and_stderr(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["submit", "--to", "slurm", "--dry-run", "--image", str(home / "app.img"), "--output", "stdout.txt", "--", "true"]
    )
    err = capsys.readouterr().err
    assert code == 125 and "stdout.txt" in err and err.count("\n") == 1


def test_a_non_utf8_argument_passes_through_and_a_failed_submit_leaves_no_staging(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SBATCH_EXIT", "1")
    code = main(["submit", "--to", "slurm", "--image", str(home / "app.img"), "--", "echo", NOT_UTF8])
    err = capsys.readouterr().err
    assert code == 125 and err.startswith("apppot: error: sbatch refused the job") and err.count("\n") == 1
    assert b" echo 'caf\xe9'\n" in (home / "submitted.sh").read_bytes()
    assert staged(home) == []


def test_a_failed_arc_submit_leaves_no_staging(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arcsub = home / "bin" / "arcsub"
    arcsub.write_text("#!/bin/sh\necho 'no proxy' >&2\nexit 1\n")
    arcsub.chmod(0o755)
    (home / "work" / "data.in").write_text("data\n")
    code = main(["submit", "--to", "arc", "--ce", "https://ce.invalid/arex", "--input", "data.in", "--", "echo", NOT_UTF8])
    err = capsys.readouterr().err
    assert code == 125 and err.startswith("apppot: error: arcsub to https://ce.invalid/arex failed") and err.count("\n") == 1
    assert staged(home) == []


def test_an_input_that_cannot_be_copied_leaves_no_staging(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "work" / "a.in").write_text("a\n")
    # A regular file by stat whose reading fails (EIO at offset 0), even for root: the copy fails mid-staging.
    argv = ["submit", "--to", "slurm", "--image", str(home / "app.img"), "--input", "a.in", "--input", "/proc/self/mem"]
    code = main([*argv, "--", "true"])
    err = capsys.readouterr().err
    assert code == 125 and err.startswith("apppot: error:") and err.count("\n") == 1
    assert staged(home) == []


def test_a_dry_run_prints_non_utf8_arguments_as_bytes(home: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["submit", "--to", "slurm", "--dry-run", "--image", str(home / "app.img"), "--", "echo", NOT_UTF8]) == 0
    assert capfdbinary.readouterr().out.endswith(b" -- echo 'caf\xe9'\n")
    assert staged(home) == []


def lock_up_for_nobody(home: Path, job: Path) -> None:
    """The cache becomes nobody's (the unprivileged user who removes it, under root) and the job's
    locked/deeper directories unreadable, as a job may leave them."""
    if os.geteuid() == 0:
        open_to_all(home)
        for path in [home / "cache", *(home / "cache").rglob("*")]:
            os.lchown(path, 65534, 65534)
    os.chmod(job / "locked" / "deeper", 0)
    os.chmod(job / "locked", 0)


def test_clean_removes_what_the_job_left_unreadable(home: Path) -> None:
    from apppot.submit import jobs

    job = fake_slurm_job(home, [])
    (job / "locked" / "deeper").mkdir(parents=True)
    (job / "locked" / "deeper" / "f").write_text("x")
    (job / "link").symlink_to(home / "work")  # never followed: what it points at stays
    lock_up_for_nobody(home, job)
    unprivileged(lambda: jobs.remove_stage(job.parent))
    assert staged(home) == [] and (home / "work").is_dir()


def test_clean_counts_what_it_removes_as_du_does(home: Path) -> None:
    """Hard links once; directories the job left unreadable too (remove_stage removes them all the same)."""
    import subprocess

    from apppot.submit import jobs

    job = fake_slurm_job(home, [])
    (job / "locked" / "deeper").mkdir(parents=True)
    (job / "locked" / "deeper" / "big").write_bytes(os.urandom(1 << 20))
    (job / "once").write_bytes(os.urandom(1 << 20))
    for i in range(3):
        os.link(job / "once", job / f"again-{i}")
    (job / "link").symlink_to(home / "work")
    expected = int(subprocess.run(["du", "-s", "-B1", str(job)], capture_output=True, text=True, check=True).stdout.split()[0])
    assert expected > 2 << 20
    lock_up_for_nobody(home, job)
    measured = home / "cache" / "measured"  # the cache is the unprivileged user's

    def measure() -> None:
        measured.write_text(str(jobs.disk_usage(job)))

    unprivileged(measure)
    assert int(measured.read_text()) == expected


@pytest.mark.parametrize("cache", ["cache%j", "cache\\x", "cache\nx", os.fsdecode(b"caf\xe9")])
def test_a_staging_path_slurm_would_expand_is_refused_before_staging(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cache: str
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / cache))
    code = main(["submit", "--to", "slurm", "--image", str(home / "app.img"), "--", "true"])
    err = capsys.readouterr().err
    assert code == 125 and "set XDG_CACHE_HOME to a path without it" in err and err.count("\n") == 1
    assert not (home / cache).exists()


def test_a_staging_path_with_blanks_is_fine(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "my cache"))
    assert main(["submit", "--to", "slurm", "--image", str(home / "app.img"), "--", "true"]) == 0
    assert len(list((home / "my cache" / "apppot" / "jobs").iterdir())) == 1

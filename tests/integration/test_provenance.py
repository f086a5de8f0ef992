"""apppot start --record: real jobs, and each field of their record checked against what they ran."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import apppot
from apppot.kernel import KernelRecord
from apppot.record_document import SCHEMA, problems
from tests.conftest import APPPOT
from tests.integration.conftest import apppot_cli, own_kernel_only
from tests.integration.test_snap import hand_made_archive

pytestmark = pytest.mark.uml

uml_kernel = own_kernel_only  # AppPot's UML kernel only: its build record is what the kernel fields are checked against


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_record(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA
    assert problems(doc) == []
    return doc


def check_times(doc: dict[str, Any], before: float, after: float) -> None:
    started = datetime.fromisoformat(doc["started"]).timestamp()
    ended = datetime.fromisoformat(doc["ended"]).timestamp()
    assert doc["started"].endswith("Z") and doc["ended"].endswith("Z")
    assert before - 0.01 <= started <= ended <= after + 0.01
    assert abs(doc["wall_seconds"] - (ended - started)) < 0.05


def test_a_record_says_what_ran(
    cache_home: Path, debian_dev: dict[str, Any], own_kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A named image, a changes archive and a command: every field against what the job ran."""
    monkeypatch.delenv("APPPOT_BACKEND", raising=False)
    job = tmp_path / "job"
    job.mkdir()
    archive = hand_made_archive(tmp_path / "mine.tar.gz", str(debian_dev["base_id"]), [("opt/merged.txt", b"merged\n")])
    record = tmp_path / "record.json"
    before = time.time()
    r = apppot_cli(
        cache_home,
        *("start", "--record", str(record), "--image", "debian-dev", "--changes", str(archive), "--mem", "256M", "--no-net"),
        *("--", "sh", "-c", "cat /opt/merged.txt; gcc --version >/dev/null"),
        cwd=job,
    )
    after = time.time()
    assert (r.returncode, r.stdout) == (0, b"merged\n"), r.err
    doc = read_record(record)
    image = Path(str(debian_dev["path"]))
    built = KernelRecord.read(own_kernel)
    assert built is not None
    assert doc["apppot"] == {"version": apppot.__version__}
    assert doc["host"]["name"] == os.uname().nodename and doc["host"]["uid"] == os.getuid()
    assert doc["backend"] == {"name": "uml", "asked": "uml", "asked_by": "default", "accel": None, "why": "uml (default)"}
    assert doc["kernel"] == {
        "path": str(own_kernel.resolve()),
        "sha256": sha256(own_kernel),
        "found_by": "APPPOT_KERNEL",
        "release": built.release,
        "config_sha256": sha256(own_kernel.parent / "config"),
        "source_package": f"{built.source_package} {built.source_version}",
        "seccomp": doc["kernel"]["seccomp"],  # what this host allows: measured, not configured
        "initrd": None,
    }
    assert isinstance(doc["kernel"]["seccomp"], bool)
    assert doc["image"]["path"] == str(image.resolve())
    assert doc["image"]["content_id"] == debian_dev["content_id"] == sha256(image)
    assert doc["image"]["came_by"] == "name" and doc["image"]["matches_record"] is True
    assert doc["image"]["record"] == {
        "name": "debian-dev",
        "recipe_id": debian_dev["recipe_id"],
        "content_id": debian_dev["content_id"],
        "base_id": debian_dev["base_id"],
        "distribution": "debian",
        "suite": "bookworm",
        "built": debian_dev["built"],
        "packages": debian_dev["packages"],
    }
    installed = doc["image"]["installed"]
    assert any(p.startswith("gcc=") for p in installed) and all("=" in p for p in installed)
    assert doc["changes"] == {
        "path": str(archive),
        "sha256": sha256(archive),
        "base_id": debian_dev["base_id"],
        "members": 1,
        "deleted": 0,
        "merged_automatically": False,
    }
    assert doc["cow"] is None and doc["writable_image"] is False
    assert doc["command"] == {"argv": ["sh", "-c", "cat /opt/merged.txt; gcc --version >/dev/null"], "source": "argv"}
    assert doc["job_dir"] == str(job)
    assert doc["memory"] == {"asked_bytes": 256 << 20, "bytes": 256 << 20}
    assert doc["cpu"]["asked"] == "auto" and doc["cpu"]["pinned"] in os.sched_getaffinity(0)
    assert doc["network"] == {"enabled": False, "host_loopback": False}
    check_times(doc, before, after)
    assert doc["exit"] == {"status": 0, "meaning": "job", "reason": None, "signal": None}


def test_a_failing_job_from_the_job_directory_with_changes_found_there(
    cache_home: Path, debian_dev: dict[str, Any], tmp_path: Path
) -> None:
    """Exit 3 from job/apppot-run, apppot-changes.tar.gz merged because it is in the job directory; APPPOT_RECORD."""
    job = tmp_path / "job"
    job.mkdir()
    hand_made_archive(job / "apppot-changes.tar.gz", str(debian_dev["base_id"]), [("opt/a", b"a"), ("opt/b", b"b")])
    merged = sha256(job / "apppot-changes.tar.gz")
    script = job / "apppot-run"
    # The job replaces the archive after it was merged: the record says what was merged.
    script.write_text("#!/bin/sh\ncat /opt/a /opt/b\necho other > apppot-changes.tar.gz\nexit 3\n")
    script.chmod(0o755)
    record = tmp_path / "record.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "APPPOT_RECORD": str(record)}
    r = subprocess.run([APPPOT, "start", "--image", "debian-dev"], cwd=job, env=env, capture_output=True, check=False)
    assert (r.returncode, r.stdout) == (3, b"ab"), r.stderr
    doc = read_record(record)
    assert doc["command"] == {"argv": ["./apppot-run"], "source": "job-directory"}
    assert doc["changes"]["merged_automatically"] is True and doc["changes"]["members"] == 2
    assert doc["changes"]["sha256"] == merged != sha256(job / "apppot-changes.tar.gz")
    assert doc["exit"] == {"status": 3, "meaning": "job", "reason": None, "signal": None}


def test_a_guest_that_dies_is_recorded_with_122_and_its_reason(apppot, jobdir: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    r = apppot(["start", "--record", str(record), "--user", "root", "--", "sh", "-c", "echo c > /proc/sysrq-trigger"], cwd=jobdir)
    assert r.returncode == 122, r.err
    doc = read_record(record)
    assert doc["exit"]["status"] == 122 and doc["exit"]["meaning"] == "guest-died"
    assert "Kernel panic" in doc["exit"]["reason"] and doc["exit"]["reason"] in r.err
    assert doc["image"]["came_by"] == "default" and doc["image"]["record"]["name"] == "tiny"


def test_a_refusal_after_the_options_is_recorded_with_125(apppot, jobdir: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    r = apppot(["start", "--record", str(record), "--image", "no-such-image", "--", "touch", "ran"], cwd=jobdir)
    assert r.returncode == 125 and r.err.count("\n") == 1, r.err
    doc = read_record(record)
    assert doc["exit"]["meaning"] == "apppot-error" and doc["exit"]["status"] == 125
    assert doc["exit"]["reason"] in r.err and "no-such-image" in doc["exit"]["reason"]
    assert doc["image"] == {
        "path": "no-such-image",
        "content_id": None,
        "came_by": "name",
        "record": None,
        "matches_record": None,
        "installed": None,
    }
    assert doc["kernel"] is None and not (jobdir / "ran").exists()


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_record_path_that_is_no_file_is_refused_before_the_job(apppot, jobdir: Path, tmp_path: Path, kind: str) -> None:
    record = tmp_path / "record.json"
    if kind == "fifo":
        os.mkfifo(record)
    else:
        record.symlink_to(tmp_path / "elsewhere")
    r = apppot(["start", "--record", str(record), "--", "touch", "ran"], cwd=jobdir, timeout=30)
    assert r.returncode == 125 and "--record" in r.err and r.err.count("\n") == 1, r.err
    assert not (jobdir / "ran").exists() and not (tmp_path / "elsewhere").exists()


def test_a_record_directory_a_job_left_as_a_link_is_refused_before_the_job(apppot, jobdir: Path, tmp_path: Path) -> None:
    """An earlier job ran `rmdir out && ln -s ELSEWHERE out` in the job directory: the record is not sent there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (jobdir / "out").symlink_to(elsewhere)
    r = apppot(
        ["start", "--jobdir", str(jobdir), "--record", str(jobdir / "out" / "record.json"), "--", "touch", "ran"], timeout=30
    )
    assert r.returncode == 125 and r.err.count("\n") == 1, r.err
    assert "out in the job directory is a symbolic link" in r.err
    assert list(elsewhere.iterdir()) == [] and not (jobdir / "ran").exists()


def test_a_record_that_cannot_be_written_is_125_and_gives_the_jobs_status(apppot, jobdir: Path) -> None:
    """The job removes the record's directory (it is in the job directory): the job's status 3 is told, exit 125."""
    (jobdir / "records").mkdir()
    r = apppot(["start", "--record", "records/job.json", "--", "sh", "-c", "rmdir records; exit 3"], cwd=jobdir)
    assert r.returncode == 125, r.err
    assert r.err.startswith("apppot: error: cannot write the record records/job.json") and r.err.count("\n") == 1, r.err
    assert "the job's status was 3" in r.err


def test_a_job_stopped_by_a_signal_is_recorded(cache_home: Path, tiny_image: Path, jobdir: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "APPPOT_IMAGE": str(tiny_image)}
    argv = [APPPOT, "start", "--record", str(record), "--", "sh", "-c", "touch started; sleep 60"]
    with subprocess.Popen(argv, cwd=jobdir, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 60
        while not (jobdir / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    doc = read_record(record)
    assert doc["exit"] == {"status": 143, "meaning": "stopped", "reason": None, "signal": "SIGTERM"}


@pytest.mark.qemu
@pytest.mark.parametrize("backend", ["qemu"], indirect=True)
def test_a_qemu_job_records_its_kernel_initramfs_and_accelerator(apppot, jobdir: Path, tmp_path: Path, backend: str) -> None:
    record = tmp_path / "record.json"
    r = apppot(["start", "--record", str(record), "--", "sh", "-c", "exit 3"], cwd=jobdir, timeout=300)
    assert r.returncode == 3, r.err
    doc = read_record(record)
    assert (doc["backend"]["name"], doc["backend"]["accel"], doc["backend"]["asked_by"]) == ("qemu", "tcg", "$APPPOT_BACKEND")
    kernel = doc["kernel"]
    assert kernel["found_by"] == "guest-kernel" and kernel["seccomp"] is None
    assert kernel["sha256"] == sha256(Path(kernel["path"]))
    assert kernel["initrd"]["sha256"] == sha256(Path(kernel["initrd"]["path"]))
    assert kernel["release"] in kernel["source_package"]
    assert doc["exit"] == {"status": 3, "meaning": "job", "reason": None, "signal": None}

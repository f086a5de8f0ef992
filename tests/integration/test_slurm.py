"""`apppot submit` to a real Slurm: the project's own test cluster (apppot testbed), jobs submitted by an
unprivileged user and run by slurmd as that user, booting UML inside the batch jobs. The user runs
the copy of AppPot the testbed installs for every user (the project's virtualenv may live in a
Python other users cannot reach)."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_USER, chown_to, open_to_all
from tests.integration.conftest import SiteUser, apppot_cli, own_kernel_only, running_testbed

pytestmark = pytest.mark.uml

SCRIPT = '#!/bin/sh\n# added by a changes archive\nwc -w < "$1" > result.txt\necho "counted $1"\n'


uml_kernel = own_kernel_only  # AppPot's UML kernel only


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two simulated nodes, started and stopped by the project's own testbed code."""
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.skip("the Slurm test cluster needs root and slurm-wlm (make test installs it)")
    directory = tmp_path_factory.mktemp("testbed")
    env = {**os.environ, "APPPOT_TESTBED_DIR": str(directory)}
    with running_testbed(directory, env, ["--nodes", "2"], stops="slurmctld") as stdout:
        conf = directory / "etc" / "slurm.conf"
        assert stdout.strip() == f"export SLURM_CONF={conf}"
        yield conf


@pytest.fixture
def user(cluster: Path, test_user: str, tmp_path: Path) -> SiteUser:
    home = tmp_path / "home"
    (home / "cache").mkdir(parents=True)
    for p in (home, home / "cache"):
        chown_to(p, test_user)
    os.chmod(tmp_path, 0o755)
    return SiteUser(cluster.parent.parent, home, home / "cache")


def workdir(user: SiteUser, name: str) -> Path:
    d = user.home / name
    d.mkdir()
    chown_to(d, TEST_USER)
    return d


@pytest.fixture(scope="module")
def counter_changes(cache_home: Path, debian_dev: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A changes archive that adds /usr/local/bin/count-words to the dev appliance."""
    job = tmp_path_factory.mktemp("make-changes")
    (job / "count-words").write_text(SCRIPT)
    make = "install -m 755 count-words /usr/local/bin/ && apppot-snap changes /home/user/job/counter.tar.gz"
    r = apppot_cli(cache_home, "start", "--image", "debian-dev", "--", "sh", "-c", make, cwd=job)
    assert r.returncode == 0, r.err
    archive = job / "counter.tar.gz"
    os.chmod(archive, 0o644)
    open_to_all(job)
    return archive


def test_the_same_job_locally_and_through_slurm(
    user: SiteUser, cache_home: Path, debian_dev: dict[str, object], counter_changes: Path
) -> None:
    image = str(debian_dev["path"])
    local = workdir(user, "local")
    (local / "data.in").write_text("one two three four\n")
    chown_to(local / "data.in", TEST_USER)
    r = user.run("start", "--image", image, "--changes", str(counter_changes), "--", "count-words", "data.in", cwd=local)
    assert r.returncode == 0, r.err
    local_result = (local / "result.txt").read_text()

    submit_dir = workdir(user, "submit")
    (submit_dir / "data.in").write_text("one two three four\n")
    started = time.monotonic()
    r = user.run(
        "submit", "--to", "slurm", "--image", image, "--changes", str(counter_changes), "--input", "data.in",
        "--output", "result.txt", "--mem", "256M", "--time", "10", "--", "count-words", "data.in", cwd=submit_dir,
    )  # fmt: skip
    assert r.returncode == 0, r.err
    job_id = r.stdout.decode().strip()
    assert job_id.startswith("slurm-")
    status = user.wait(job_id, submit_dir)
    print(f"submit to result through Slurm: {time.monotonic() - started:.1f} s")
    assert (status["state"], status["exit_code"]) == ("COMPLETED", 0)
    r = user.run("fetch", job_id, cwd=submit_dir)
    assert r.returncode == 0, r.err
    fetched = submit_dir / job_id
    assert (fetched / "result.txt").read_text() == local_result == "4\n"
    assert (fetched / "stdout.txt").read_text() == "counted data.in\n"
    assert (fetched / "result.txt").stat().st_uid == pwd.getpwnam(TEST_USER).pw_uid
    assert (submit_dir / "data.in").read_text() == "one two three four\n"  # the submission directory is untouched
    record = json.loads((fetched / "apppot-record.json").read_text())  # what ran on the worker, fetched with the outputs
    assert record["image"]["path"] == image and record["image"]["content_id"] == debian_dev["content_id"]
    assert record["changes"]["sha256"] == hashlib.sha256(counter_changes.read_bytes()).hexdigest()
    assert record["command"] == {"argv": ["count-words", "data.in"], "source": "argv"}
    assert record["job_dir"].endswith("/job") and record["exit"]["status"] == 0 and record["exit"]["meaning"] == "job"
    # A second fetch does not overwrite without --force.
    r = user.run("fetch", job_id, cwd=submit_dir)
    assert r.returncode == 125 and "exists; move it away or pass --force" in r.err
    assert user.run("fetch", "--force", job_id, cwd=submit_dir).returncode == 0


def test_a_failing_job_shows_its_exit_code(user: SiteUser, tiny_image: Path) -> None:
    d = workdir(user, "failing")
    r = user.run("submit", "--to", "slurm", "--image", str(tiny_image), "--", "sh", "-c", "echo bad >&2; exit 3", cwd=d)
    assert r.returncode == 0, r.err
    job_id = r.stdout.decode().strip()
    status = user.wait(job_id, d)
    assert (status["state"], status["exit_code"]) == ("FAILED", 3)
    text = user.run("status", job_id, cwd=d).stdout.decode()
    assert text == f"{job_id}: FAILED, exit code 3 (the job exited with status 3)\n"
    scontrol = subprocess.run(
        ["scontrol", "show", "job", job_id.removeprefix("slurm-")], env=user.env, capture_output=True, text=True
    )
    assert "ExitCode=3:0" in scontrol.stdout
    assert user.run("fetch", job_id, cwd=d).returncode == 0
    assert (d / job_id / "stderr.txt").read_text() == "bad\n"
    record = json.loads((d / job_id / "apppot-record.json").read_text())
    assert record["exit"] == {"status": 3, "meaning": "job", "reason": None, "signal": None}


def test_five_jobs_at_once(user: SiteUser, tiny_image: Path) -> None:
    d = workdir(user, "five")
    ids = []
    for i in range(5):
        r = user.run(
            "submit", "--to", "slurm", "--image", str(tiny_image), "--output", "out.txt", "--",
            "sh", "-c", f"echo job {i} > out.txt", cwd=d,
        )  # fmt: skip
        assert r.returncode == 0, r.err
        ids.append(r.stdout.decode().strip())
    for i, job_id in enumerate(ids):
        assert user.wait(job_id, d)["state"] == "COMPLETED"
        assert user.run("fetch", job_id, cwd=d).returncode == 0
        assert (d / job_id / "out.txt").read_text() == f"job {i}\n"


def test_cancel(user: SiteUser, tiny_image: Path) -> None:
    d = workdir(user, "cancel")
    r = user.run("submit", "--to", "slurm", "--image", str(tiny_image), "--", "sleep", "300", cwd=d)
    job_id = r.stdout.decode().strip()
    assert user.run("cancel", job_id, cwd=d).returncode == 0
    status = user.wait(job_id, d)
    assert status["state"] == "CANCELLED" and status["explanation"] == "cancelled"


def test_dry_run_and_bad_input(user: SiteUser, tiny_image: Path) -> None:
    d = workdir(user, "dry")
    r = user.run("submit", "--to", "slurm", "--dry-run", "--image", str(tiny_image), "--mem", "512M", "--", "true", cwd=d)
    assert r.returncode == 0 and "#SBATCH --mem=576M" in r.stdout.decode()
    assert list(d.iterdir()) == []
    r = user.run("status", "slurm-999999", cwd=d)
    assert r.returncode == 125 and "no job slurm-999999 was submitted from this account" in r.err
    r = user.run("submit", "--to", "slurm", "--image", str(tiny_image), "--input", "missing.dat", "--", "true", cwd=d)
    assert r.returncode == 125 and "input" in r.err and "is not a file" in r.err
    user.env["SLURM_CONF"] = "/nonexistent/slurm.conf"
    r = user.run("submit", "--to", "slurm", "--image", str(tiny_image), "--", "true", cwd=d)
    # Refused at once: sbatch would retry a missing slurm.conf for a minute.
    assert (
        r.returncode == 125
        and r.err
        == "apppot: error: SLURM_CONF names /nonexistent/slurm.conf, which is not a file: point it at the cluster's slurm.conf\n"
    ), r.err


def test_a_job_killed_at_its_wall_time_limit_says_so_and_keeps_its_outputs(user: SiteUser, tiny_image: Path) -> None:
    d = workdir(user, "walltime")
    r = user.run(
        "submit", "--to", "slurm", "--image", str(tiny_image), "--time", "1", "--output", "partial.txt", "--",
        "sh", "-c", "echo started > partial.txt; sleep 600", cwd=d,
    )  # fmt: skip
    job_id = r.stdout.decode().strip()
    user.wait_timeout = 240  # Slurm checks time limits every 30 s or so
    status = user.wait(job_id, d)
    assert status["state"] == "TIMEOUT" and status["explanation"] == "killed at its wall-time limit (--time)"
    r = user.run("fetch", job_id, cwd=d)
    assert r.returncode == 0, r.err
    assert (d / job_id / "partial.txt").read_text() == "started\n"
    record = json.loads((d / job_id / "apppot-record.json").read_text())  # Slurm's SIGTERM at the limit: still recorded
    assert record["exit"] == {"status": 143, "meaning": "stopped", "reason": None, "signal": "SIGTERM"}


def test_a_hostile_job_and_hostile_names(user: SiteUser, tiny_image: Path) -> None:
    """The job leaves result.txt -> /etc/shadow; its staging path has a blank, its command a newline,
    '#', '%' and quotes. The command arrives exactly, the streams land where they should, and fetch
    refuses the link by name instead of following it (or copying it as a link). A staging path with
    '%' is refused before anything is staged: slurmd expands it in the output paths."""
    d = workdir(user, "hostile")
    percent = user.home / "cache%j"
    user.env["XDG_CACHE_HOME"] = str(percent)
    r = user.run("submit", "--to", "slurm", "--image", str(tiny_image), "--", "true", cwd=d)
    assert r.returncode == 125 and r.err.count("\n") == 1 and "set XDG_CACHE_HOME to a path without it" in r.err
    assert not percent.exists()
    cache = user.home / "ca che"
    cache.mkdir()
    chown_to(cache, TEST_USER)
    user.env["XDG_CACHE_HOME"] = str(cache)
    word = "line one\n#SBATCH --mem=1M %j 'q\""
    job = 'ln -s /etc/shadow result.txt; printf "%s\\n" "$1" > ok.txt; echo done'
    r = user.run(
        "submit", "--to", "slurm", "--image", str(tiny_image), "--output", "result.txt", "--output", "ok.txt",
        "--", "sh", "-c", job, "sh", word, cwd=d,
    )  # fmt: skip
    assert r.returncode == 0, r.err
    job_id = r.stdout.decode().strip()
    status = user.wait(job_id, d)
    assert (status["state"], status["exit_code"]) == ("COMPLETED", 0)
    stage = next((cache / "apppot" / "jobs").iterdir())
    assert os.readlink(stage / "job" / "result.txt") == "/etc/shadow"  # the job did leave the link
    r = user.run("fetch", job_id, cwd=d)
    assert r.returncode == 125
    refusal = "refused 'result.txt' from the job: a symbolic link; copy it by hand if you trust it"
    assert r.err == f"apppot: error: {refusal}\n"
    fetched = d / job_id
    assert not (fetched / "result.txt").exists() and not (fetched / "result.txt").is_symlink()
    assert (fetched / "ok.txt").read_text() == word + "\n"
    assert (fetched / "stdout.txt").read_text() == "done\n"
    assert sorted(p.name for p in fetched.iterdir()) == ["apppot-record.json", "ok.txt", "stderr.txt", "stdout.txt"]
    assert json.loads((fetched / "apppot-record.json").read_text())["command"]["argv"] == ["sh", "-c", job, "sh", word]

"""`apppot submit --to arc`: a real A-REX (started by the project's testbed) in front of the test Slurm
cluster; the grid user is the unprivileged test user, and the jobs run as that user through the
site's APPPOT runtime environment."""

from __future__ import annotations

import os
import pwd
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apppot.testbed.arc import set_rte_params
from tests.conftest import TEST_USER, chown_to
from tests.integration.conftest import SiteUser, apppot_cli, own_kernel_only, running_testbed

pytestmark = pytest.mark.uml

CE = "https://localhost:8443/arex"
SCRIPT = '#!/bin/sh\nwc -w < "$1" > result.txt\necho "counted $1"\n'


uml_kernel = own_kernel_only  # AppPot's UML kernel only


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, cache_home: Path) -> Iterator[Path]:
    """Slurm and an ARC CE, started and stopped by `apppot testbed`; returns the testbed directory."""
    if os.geteuid() != 0 or shutil.which("arcsub") is None or shutil.which("slurmctld") is None:
        pytest.skip("the ARC test CE needs root, slurm-wlm and nordugrid-arc (make test installs them)")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.skip(f"no user {TEST_USER}: run the tests through 'make test' as root")
    directory = tmp_path_factory.mktemp("Grid-APPS")  # capitals: arcctl would fail here
    env = {**os.environ, "APPPOT_TESTBED_DIR": str(directory), "XDG_CACHE_HOME": str(cache_home)}
    elsewhere = tmp_path_factory.mktemp("Elsewhere")  # root's alone: `up` works from any directory
    with running_testbed(directory, env, ["--arc", TEST_USER], stops="arex", cwd=elsewhere):
        yield directory


def grid_user(directory: Path) -> SiteUser:
    """The grid user: the test user, with the home that holds its certificate and ARC's job list."""
    cache = directory / "user-cache"
    cache.mkdir(exist_ok=True)
    chown_to(cache, TEST_USER)
    return SiteUser(directory, Path(pwd.getpwnam(TEST_USER).pw_dir), cache, wait_timeout=240, run_timeout=180)


def site_image(directory: Path, image: str) -> None:
    """As the site's administrator: the APPPOT runtime environment's default image (not with arcctl,
    which loses RTEs under a path with capitals such as this one's; see apppot.testbed.arc)."""
    set_rte_params(directory / "arc", {"APPPOT_IMAGE": image})


def workdir(base: Path, name: str) -> Path:
    d = base / name
    d.mkdir()
    chown_to(d, TEST_USER)
    os.chmod(base, 0o755)
    return d


def test_the_same_job_locally_through_slurm_and_through_arc(
    grid: Path, cache_home: Path, debian_dev: dict[str, object], tmp_path: Path
) -> None:
    image = str(debian_dev["path"])
    maker = tmp_path / "make-changes"
    maker.mkdir()
    (maker / "count-words").write_text(SCRIPT)
    make = "install -m 755 count-words /usr/local/bin/ && apppot-snap changes /home/user/job/counter.tar.gz"
    assert apppot_cli(cache_home, "start", "--image", image, "--", "sh", "-c", make, cwd=maker).returncode == 0
    changes = maker / "counter.tar.gz"
    os.chmod(changes, 0o644)
    os.chmod(tmp_path, 0o755)
    os.chmod(maker, 0o755)
    site_image(grid, image)
    user = grid_user(grid)
    results = {}
    for target in ("local", "slurm", "arc"):
        d = workdir(tmp_path, target)
        (d / "data.in").write_text("one two three four five\n")
        chown_to(d / "data.in", TEST_USER)
        if target == "local":
            r = user.run("start", "--image", image, "--changes", str(changes), "--", "count-words", "data.in", cwd=d)
            assert r.returncode == 0, r.err
            results[target] = ((d / "result.txt").read_text(), r.stdout.decode())
            continue
        where = ["--image", image] if target == "slurm" else ["--ce", CE]  # ARC: the site's image
        started = time.monotonic()
        r = user.run(
            "submit", "--to", target, *where, "--changes", str(changes), "--input", "data.in", "--output", "result.txt",
            "--", "count-words", "data.in", cwd=d,
        )  # fmt: skip
        assert r.returncode == 0, r.err
        job_id = r.stdout.decode().strip()
        status = user.wait(job_id, d)
        assert (status["state"], status["exit_code"]) == ("COMPLETED", 0), status
        fetch = user.run("fetch", job_id, cwd=d)
        assert fetch.returncode == 0, fetch.err
        print(f"{target}: submit to fetched result in {time.monotonic() - started:.1f} s")
        results[target] = ((d / job_id / "result.txt").read_text(), (d / job_id / "stdout.txt").read_text())
    assert results["local"] == results["slurm"] == results["arc"] == ("5\n", "counted data.in\n")


def test_a_failing_job_shows_exit_code_3_through_arc(grid: Path, tmp_path: Path) -> None:
    site_image(grid, str(grid / "site" / "images" / "tiny.img"))
    user = grid_user(grid)
    d = workdir(tmp_path, "failing")
    r = user.run("submit", "--to", "arc", "--ce", CE, "--", "sh", "-c", "echo bad >&2; exit 3", cwd=d)
    assert r.returncode == 0, r.err
    job_id = r.stdout.decode().strip()
    assert job_id.startswith("arc-")
    status = user.wait(job_id, d)
    assert (status["state"], status["exit_code"]) == ("FAILED", 3), status
    assert user.run("fetch", job_id, cwd=d).returncode == 0
    assert (d / job_id / "stderr.txt").read_text() == "bad\n"
    # clean: gone from the CE and from here
    assert user.run("clean", job_id, cwd=d).returncode == 0
    r = user.run("status", job_id, cwd=d)
    assert r.returncode == 125 and f"no job {job_id} was submitted" in r.err

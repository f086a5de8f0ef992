"""`apppot submit --to arc`: a real A-REX (started by the project's testbed) in front of the test Slurm
cluster; the grid user is the unprivileged test user, and the jobs run as that user through the
site's APPPOT runtime environment."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apppot.submit.arc import parse_arcstat
from apppot.testbed.arc import publish_rte, rte_params_file, set_rte_params
from tests import readme
from tests.conftest import ROOT, TEST_USER, Result, chown_to
from tests.integration.conftest import SiteUser, apppot_cli, own_kernel_only, running_testbed
from tests.readme import example

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
        user = grid_user(directory)
        stale = arc_job_list()
        if stale:  # left by earlier runs, on CEs long gone: forgotten, so that the check below is exact
            arc_client(user, "arcclean", "-f", *stale, cwd=directory)
        assert arc_job_list() == []
        yield directory
        left = arc_job_list()
        if left:  # cleaned, so that the next run starts empty, and reported
            arc_client(user, "arcclean", "-f", *left, cwd=directory)
        assert left == [], f"the ARC tests left jobs in {TEST_USER}'s job list (arcget -a and arcclean -a warn)"


def arc_job_list() -> list[str]:
    """The jobs in the test user's ARC job list (~/.arc/jobs.dat, ARC 6's SQLite list)."""
    jobs = Path(pwd.getpwnam(TEST_USER).pw_dir) / ".arc" / "jobs.dat"
    if not jobs.exists():
        return []
    with sqlite3.connect(f"file:{jobs}?mode=ro", uri=True) as db:
        return sorted(row[0] for row in db.execute("SELECT id FROM jobs"))


def arc_client(user: SiteUser, *argv: str, cwd: Path) -> Result:
    """One of ARC's own client programs, run as the grid user would (its environment, its proxy)."""
    as_user = ["setpriv", f"--reuid={TEST_USER}", f"--regid={TEST_USER}", "--init-groups", "--", *argv]
    proc = subprocess.run(as_user, cwd=cwd, env=user.env, capture_output=True, timeout=120, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


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
        record = json.loads((d / job_id / "apppot-record.json").read_text())
        assert record["changes"]["sha256"] == hashlib.sha256(changes.read_bytes()).hexdigest()
        assert (record["command"]["argv"], record["exit"]["status"]) == (["count-words", "data.in"], 0)
        assert user.run("clean", job_id, cwd=d).returncode == 0  # nothing left on the CE nor in ARC's job list
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
    record = json.loads((d / job_id / "apppot-record.json").read_text())  # written by the site's apppot-start
    assert record["exit"] == {"status": 3, "meaning": "job", "reason": None, "signal": None}
    assert record["image"]["came_by"] == "path" and record["command"]["argv"] == ["sh", "-c", "echo bad >&2; exit 3"]
    # clean: gone from the CE and from here
    assert user.run("clean", job_id, cwd=d).returncode == 0
    r = user.run("status", job_id, cwd=d)
    assert r.returncode == 125 and f"no job {job_id} was submitted" in r.err


def test_a_record_the_job_forged_is_never_fetched_through_arc(grid: Path, tmp_path: Path) -> None:
    """The job leaves its own apppot-record.json and takes away the session directory's write permission
    (as a full disk would, AppPot could not have replaced it there): AppPot's record is fetched all the same."""
    site_image(grid, str(grid / "site" / "images" / "tiny.img"))
    user = grid_user(grid)
    d = workdir(tmp_path, "forging")
    forge = "printf '{\"forged\": true}' > apppot-record.json; chmod a-w ."
    r = user.run("submit", "--to", "arc", "--ce", CE, "--", "sh", "-c", forge, cwd=d)
    assert r.returncode == 0, r.err
    job_id = r.stdout.decode().strip()
    status = user.wait(job_id, d)
    assert (status["state"], status["exit_code"]) == ("COMPLETED", 0), status
    assert user.run("fetch", job_id, cwd=d).returncode == 0
    record = json.loads((d / job_id / "apppot-record.json").read_text())
    assert record["command"]["argv"] == ["sh", "-c", forge]
    assert record["exit"] == {"status": 0, "meaning": "job", "reason": None, "signal": None}
    assert user.run("clean", job_id, cwd=d).returncode == 0


# --- the seed's Grid job, as the slides submit it: plain arcsub, the seed's RTE names ------------

SLIDES = ROOT / "examples" / "grid"
A3D_C = """#include <stdio.h>
int main(int argc, char **argv) {
    double x, total = 0; int steps = 0; FILE *f = fopen(argv[1], "r");
    if (!f) return 2;
    while (fscanf(f, "%lf", &x) == 1) { total += x; steps++; }
    printf("steps=%d snow=%.1f\\n", steps, total);
    return 0;
}
"""
FINAL_ARC_STATES = ("Finished", "Failed", "Killed", "Deleted")


def tgz(path: Path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    chown_to(path, TEST_USER)


def slides_job(base: Path, name: str, apppot_run: str) -> Path:
    """The slides' job directory: a3d.xrsl as shipped in examples/grid, the sources, the data and apppot-run."""
    d = workdir(base, name)
    shutil.copy(SLIDES / "a3d.xrsl", d / "a3d.xrsl")
    (d / "apppot-run").write_text(apppot_run)
    (d / "apppot-run").chmod(0o755)
    for f in ("a3d.xrsl", "apppot-run"):
        chown_to(d / f, TEST_USER)
    tgz(d / "A3D_source.tgz", {"a3d.c": A3D_C})
    tgz(d / "A3D_simulation.tgz", {"meteo.txt": "1.5\n2\n3\n4\n"})
    return d


def round_trip(user: SiteUser, d: Path) -> tuple[str, list[tuple[float, str]], int | None]:
    """arcsub the job, then arcstat it until it ends; returns its URL, the states seen (with the
    seconds since arcsub) and its exit code."""
    started = time.monotonic()
    sub = arc_client(user, "arcsub", "-C", CE, "a3d.xrsl", cwd=d)
    assert sub.returncode == 0, sub.err + sub.stdout.decode()
    found = re.search(r"jobid: (\S+)", sub.stdout.decode())
    assert found, sub.stdout
    url = found.group(1)
    seen: list[tuple[float, str]] = [(time.monotonic() - started, "submitted")]
    while time.monotonic() - started < 300:
        stat = arc_client(user, "arcstat", url, cwd=d)
        parsed = parse_arcstat(stat.stdout.decode())
        if parsed is not None:
            state, code = parsed
            if state != seen[-1][1]:
                seen.append((time.monotonic() - started, state))
            if state in FINAL_ARC_STATES:
                print(f"{d.name}: " + ", ".join(f"{s} at {t:.1f} s" for t, s in seen) + f"; exit code {code}")
                return url, seen, code
        time.sleep(1)
    pytest.fail(f"{url} did not end in 300 s; states seen: {seen}")


def test_the_slides_grid_job_with_plain_arcsub_on_the_seeds_rte_names(
    grid: Path, debian_dev: dict[str, object], tmp_path: Path
) -> None:
    # The site publishes the A3D appliance as the seed's sites did: an application RTE naming its image.
    arc = grid / "arc"
    publish_rte(arc, "TEST/A3D_UML", (SLIDES / "A3D_UML").read_text())
    rte_params_file(arc, "TEST/A3D_UML").write_text(f'A3D_UML_IMAGE="{debian_dev["path"]}"\n')
    time.sleep(6)  # A-REX publishes its RTEs every 5 s (testbed's infoprovider period); arcsub matches them
    os.chmod(tmp_path, 0o755)
    user = grid_user(grid)

    d = slides_job(tmp_path, "a3d", (SLIDES / "apppot-run").read_text())
    url, seen, code = round_trip(user, d)
    assert (seen[-1][1], code) == ("Finished", 0), seen
    got = arc_client(user, "arcget", "-D", str(d / "out"), url, cwd=d)  # downloads, then cleans the job
    assert got.returncode == 0, got.err
    (out,) = (d / "out").iterdir()
    with tarfile.open(out / "results.tgz") as tar:
        assert tar.getnames() == ["summary.txt"]
        summary = tar.extractfile("summary.txt")
        assert summary is not None and summary.read() == b"steps=4 snow=10.5\n"
    assert "A3D: steps=4 snow=10.5\n" in (out / "a3d.stdout").read_text()
    assert url not in arc_job_list()

    failing = "#!/bin/sh\necho 'A3D: the build failed' >&2\nexit 3\n"
    d = slides_job(tmp_path, "a3d-failing", failing)
    url, seen, code = round_trip(user, d)
    assert (seen[-1][1], code) == ("Failed", 3), seen
    got = arc_client(user, "arcget", "--keep", "-D", str(d / "out"), url, cwd=d)
    assert got.returncode == 0, got.err
    (out,) = (d / "out").iterdir()
    assert "A3D: the build failed\n" in (out / "a3d.stdout").read_text()  # join = yes
    assert url in arc_job_list()
    assert arc_client(user, "arcclean", url, cwd=d).returncode == 0
    assert url not in arc_job_list()


# --- the README's submit example, as pasted, as the grid user ------------------------------------

README_SCRIPT = '#!/bin/sh\nwc -w < "$1" > result.txt\ncat /usr/local/share/mine.txt\n'
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DELETED")


def test_the_readme_submit_example_as_pasted(grid: Path, cache_home: Path, debian_dev: dict[str, object], tmp_path: Path) -> None:
    """README "Batch systems": each line of the submit block, as the grid user with a plain environment
    and an empty cache, in a directory holding run.sh, data.in and mine.tar.gz; app.img is the dev
    appliance, $CE the testbed's CE, JOBID what submit printed. The status line is run until the job
    is final; cancel is tried on a second submission of the first line."""
    submit_slurm, status, fetch, clean, cancel, submit_arc, dry_run = (c.text for c in example("submit").commands())
    image = str(debian_dev["path"])
    site_image(grid, image)  # the site's image, which the ARC line uses
    maker = tmp_path / "make-changes"
    maker.mkdir()
    make = "echo from mine.tar.gz > /usr/local/share/mine.txt && apppot-snap changes /home/user/job/mine.tar.gz"
    assert apppot_cli(cache_home, "start", "--image", image, "--", "sh", "-c", make, cwd=maker).returncode == 0
    os.chmod(tmp_path, 0o755)
    d = workdir(tmp_path, "readme")
    (d / "run.sh").write_text(README_SCRIPT)
    (d / "run.sh").chmod(0o755)
    (d / "data.in").write_text("one two three\n")
    shutil.copy(maker / "mine.tar.gz", d / "mine.tar.gz")
    for f in ("run.sh", "data.in", "mine.tar.gz"):
        chown_to(d / f, TEST_USER)
    cache = workdir(tmp_path, "cache")
    site = grid / "site"
    env = {
        "PATH": f"{site / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": pwd.getpwnam(TEST_USER).pw_dir,  # the grid user's certificate and ARC's job list
        "XDG_CACHE_HOME": str(cache),
        "SLURM_CONF": str(grid / "etc" / "slurm.conf"),  # as apppot testbed up prints it
        "APPPOT_KERNEL": str(site / "kernel" / "linux"),
    }

    def line(command: str, job_id: str = "") -> readme.Ran:
        script = "set -e\n" + readme.fill(command, {"app.img": image, "$CE": CE, "JOBID": job_id})
        return readme.run(script, d, env, user=TEST_USER, timeout=300)

    def submitted(command: str) -> str:
        r = line(command)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()
        assert re.fullmatch(r"(slurm|arc)-\w+", job_id), r.stdout
        return job_id

    def final(job_id: str) -> str:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            r = line(status, job_id)
            assert r.returncode == 0, r.stderr
            if r.stdout.split()[1].rstrip(",") in FINAL_STATES:
                return r.stdout
            time.sleep(1)
        pytest.fail(f"{job_id} did not end in 300 s")

    for submit in (submit_slurm, submit_arc):
        started = time.monotonic()
        job_id = submitted(submit)
        assert final(job_id) == f"{job_id}: COMPLETED, exit code 0 (the job exited with status 0)\n"
        r = line(fetch, job_id)
        assert r.returncode == 0, r.stderr
        print(f"README submit example, {job_id.split('-')[0]}: submit to fetched result in {time.monotonic() - started:.1f} s")
        assert (d / job_id / "result.txt").read_text() == "3\n"
        assert (d / job_id / "stdout.txt").read_text() == "from mine.tar.gz\n"  # the changes archive was merged
        assert line(clean, job_id).returncode == 0

    job_id = submitted(submit_slurm)
    r = line(cancel, job_id)
    assert r.returncode == 0, r.stderr
    assert final(job_id).split()[1].rstrip(",") in ("CANCELLED", "COMPLETED")  # it may have ended first
    assert line(clean, job_id).returncode == 0

    r = line(dry_run)
    assert r.returncode == 0 and "#SBATCH --mem=" in r.stdout and "-- ./run.sh data.in" in r.stdout, r.stderr
    assert sorted(p.name for p in (cache / "apppot" / "jobs").iterdir()) == []  # cleaned, and nothing from the dry run


def test_an_executable_input_and_the_commands_script_keep_their_execute_bit_through_arc(grid: Path, tmp_path: Path) -> None:
    """ARC's client uploads files without their modes: `--input run.sh -- ./run.sh` ended 126
    ("Permission denied"); the staged command's script and an executable input run."""
    site_image(grid, str(grid / "site" / "images" / "tiny.img"))
    user = grid_user(grid)
    os.chmod(tmp_path, 0o755)
    d = workdir(tmp_path, "modes")
    (d / "run.sh").write_text('#!/bin/sh\n./helper > out.txt\necho "ran $1"\n')
    (d / "helper").write_text("#!/bin/sh\necho helped\n")
    for f in ("run.sh", "helper"):
        (d / f).chmod(0o755)
        chown_to(d / f, TEST_USER)
    for how in (["--input", "run.sh"], []):
        r = user.run(
            "submit", "--to", "arc", "--ce", CE, *how, "--input", "helper", "--output", "out.txt", "--", "./run.sh", "x", cwd=d
        )
        assert r.returncode == 0, r.err
        job_id = r.stdout.decode().strip()
        status = user.wait(job_id, d)
        assert (status["state"], status["exit_code"]) == ("COMPLETED", 0), status
        assert user.run("fetch", job_id, cwd=d).returncode == 0
        assert (d / job_id / "stdout.txt").read_text() == "ran x\n"
        assert (d / job_id / "out.txt").read_text() == "helped\n"
        assert user.run("clean", job_id, cwd=d).returncode == 0


def test_status_gives_the_workers_reason_when_apppot_could_not_run_the_job(grid: Path, tmp_path: Path) -> None:
    """A job AppPot refuses on the worker (here: an image that is no filesystem) ends 125; `apppot
    status` says why in the worker's own words, from the job's stderr, instead of "see stderr.txt"."""
    user = grid_user(grid)
    os.chmod(tmp_path, 0o755)
    d = workdir(tmp_path, "refused")
    (d / "zero.img").write_bytes(b"\0" * 4096)
    chown_to(d / "zero.img", TEST_USER)
    r = user.run("submit", "--to", "slurm", "--image", "zero.img", "--", "true", cwd=d)
    assert r.returncode == 0, r.err
    job_id = r.stdout.decode().strip()
    assert user.wait(job_id, d)["exit_code"] == 125
    text = user.run("status", job_id, cwd=d).stdout.decode()
    assert text == (
        f"{job_id}: FAILED, exit code 125 (AppPot could not run the job on the worker: {d / 'zero.img'} is not an "
        "ext2/3/4 filesystem image; give an AppPot appliance image (apppot image build-tiny makes one))\n"
    )
    assert user.run("clean", job_id, cwd=d).returncode == 0

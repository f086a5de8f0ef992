"""Appliances built from recipes with mmdebstrap: the Debian dev appliance, the build-and-validate
workflow with GNU hello's own test suite, and an application appliance (GLPK's glpsol) that behaves
like the program itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import APPPOT, chown_to
from tests.integration.conftest import BOTH_BACKENDS, EXAMPLES, apppot_cli, own_kernel_only

pytestmark = pytest.mark.uml


uml_kernel = own_kernel_only  # AppPot's UML kernel only


# --- building and the cache ----------------------------------------------------------------------


def test_the_dev_appliance_is_built_once_and_listed(cache_home: Path, tiny_image: Path, debian_dev: dict[str, object]) -> None:
    assert debian_dev["name"] == "debian-dev"
    assert Path(str(debian_dev["path"])).name.startswith("debian-dev-")
    # Unchanged recipe: a cache hit.
    again = apppot_cli(cache_home, "image", "build", "--json", str(EXAMPLES / "debian-dev.toml"))
    assert again.returncode == 0, again.err
    record = json.loads(again.stdout)
    assert record["reused"] is True
    assert record["content_id"] == debian_dev["content_id"]

    listing = apppot_cli(cache_home, "image", "list", "--json")
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert rows["debian-dev"]["path"] == debian_dev["path"]
    assert "tiny" in rows
    text = apppot_cli(cache_home, "image", "list").stdout.decode()
    assert re.search(r"^debian-dev\s+[0-9a-f]{16}\s+4\.0G", text, re.M), text

    info = json.loads(apppot_cli(cache_home, "image", "info", "--json", "debian-dev").stdout)
    assert info["recipe"] == str(EXAMPLES / "debian-dev.toml")
    assert re.fullmatch(r"[0-9a-f]{64}", str(info["content_id"]))
    assert re.fullmatch(r"[0-9a-f]{64}", str(info["agent"]))
    assert info["size"] == "4.0G" and "build-essential" in info["packages"]


def test_a_failed_build_leaves_no_image(cache_home: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("building Debian appliances needs root")
    recipe = tmp_path / "broken.toml"
    recipe.write_text('name = "broken"\nsize = "512M"\ncommands = ["echo about to fail", "exit 3"]\n')
    r = apppot_cli(cache_home, "image", "build", str(recipe))
    assert r.returncode == 125
    assert "mmdebstrap failed" in r.err and "recipe command: exit 3" in r.err
    images = cache_home / "apppot" / "images"
    assert not list(images.glob("broken-*")), "no image under the final name"
    assert not [p for p in images.iterdir() if p.name.startswith(".build-")], "no build directory left"


def test_building_without_root_says_what_is_needed(cache_home: Path, tmp_path: Path, test_user: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "x"\n')
    cache = tmp_path / "user-cache"
    cache.mkdir()
    chown_to(cache, test_user)
    os.chmod(tmp_path, 0o755)
    argv = [
        "setpriv",
        f"--reuid={test_user}",
        f"--regid={test_user}",
        "--init-groups",
        "--",
        APPPOT,
        "image",
        "build",
        str(recipe),
    ]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "HOME": str(cache)}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 125
    assert "building a Debian appliance needs root" in proc.stderr and proc.stderr.count("\n") == 1


def test_a_bad_recipe_is_one_line(cache_home: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text('name = "x"\npackages = "gcc"\n')
    r = apppot_cli(cache_home, "image", "build", str(recipe))
    assert r.returncode == 125
    assert r.err.strip().count("\n") == 0 and "line 2: 'packages' must be a list of strings" in r.err


def test_an_unknown_image_name_says_how_to_build_it(apppot, jobdir: Path) -> None:
    r = apppot(["start", "--image", "no-such-appliance", "--", "true"], cwd=jobdir)
    assert r.returncode == 125
    assert "no image named no-such-appliance in the cache" in r.err and "apppot image build" in r.err


# --- running the Debian appliance ----------------------------------------------------------------


def test_a_job_in_the_debian_appliance_by_name(apppot, jobdir: Path, debian_dev: dict[str, object]) -> None:
    script = "cat /etc/debian_version; gcc --version | head -n 1; cat /proc/1/cmdline | tr '\\0' ' '; echo; pwd"
    r = apppot(["start", "--image", "debian-dev", "--", "sh", "-c", script], cwd=jobdir)
    assert r.returncode == 0, r.err
    lines = r.stdout.decode().splitlines()
    assert re.fullmatch(r"12\.\d+", lines[0])
    assert lines[1].startswith("gcc (Debian 12")
    assert lines[2].startswith("/bin/sh /usr/sbin/apppot-init"), "the agent is init: no distribution boot"
    assert lines[3] == "/home/user/job"


def test_the_debian_appliance_gives_the_user_passwordless_sudo(
    apppot, tmp_path: Path, test_user: str, debian_dev: dict[str, object]
) -> None:
    jobdir = tmp_path / "sudojob"
    jobdir.mkdir()
    chown_to(jobdir, test_user)
    script = "id -un; id -u; sudo -n id -u; sudo -n touch /root/x && echo root-can-write; touch mine"
    r = apppot(["start", "--", "sh", "-c", script], cwd=jobdir, as_user=test_user, env={"APPPOT_IMAGE": str(debian_dev["path"])})
    uid = str(os.stat(jobdir).st_uid)
    assert (r.returncode, r.stdout.decode()) == (0, f"user\n{uid}\n0\nroot-can-write\n"), r.err
    assert (jobdir / "mine").stat().st_uid == int(uid)


# --- the build-and-validate workflow -------------------------------------------------------------


def validate_job(tmp_path: Path, tarball: Path, name: str) -> Path:
    job = tmp_path / name
    job.mkdir()
    shutil.copy2(EXAMPLES / "validate" / "apppot-run", job / "apppot-run")
    shutil.copy2(tarball, job / tarball.name)
    return job


def test_gnu_hello_builds_and_passes_its_own_tests(
    apppot, tmp_path: Path, hello_tarball: Path, debian_dev: dict[str, object]
) -> None:
    job = validate_job(tmp_path, hello_tarball, "hello-ok")
    r = apppot(["start", "--image", "debian-dev"], cwd=job, timeout=900)
    summary = (job / "summary.txt").read_text()
    assert r.returncode == 0, r.err + summary
    assert re.search(r"^configure: +ok", summary, re.M) and re.search(r"^check: +ok", summary, re.M)
    assert summary.splitlines()[-1].startswith("PASS: hello-")
    with tarfile.open(job / "results.tar.gz") as results:
        names = results.getnames()
    assert "logs/check.log" in names and "logs/config.log" in names
    assert any(n.endswith("test-suite.log") for n in names)
    with tarfile.open(job / "results.tar.gz") as results:
        member = results.extractfile("logs/check.log")
        assert member is not None
        assert re.search(rb"^# PASS: +[1-9]", member.read(), re.M)


def test_a_broken_hello_makes_apppot_start_fail(
    apppot, tmp_path: Path, hello_tarball: Path, debian_dev: dict[str, object]
) -> None:
    """The source builds, but greets wrongly: hello's own tests fail, and so does the job."""
    unpacked = tmp_path / "unpacked"
    with tarfile.open(hello_tarball) as t:
        t.extractall(unpacked, filter="data")
    (top,) = unpacked.iterdir()
    hello_c = top / "src" / "hello.c"
    source = hello_c.read_text()
    assert '_("Hello, world!")' in source
    hello_c.write_text(source.replace('_("Hello, world!")', '_("Goodbye, world!")'))
    broken = tmp_path / f"{top.name}.tar.gz"
    with tarfile.open(broken, "w:gz") as t:
        t.add(top, arcname=top.name)
    job = validate_job(tmp_path, broken, "hello-broken")
    r = apppot(["start", "--image", "debian-dev"], cwd=job, timeout=900)
    summary = (job / "summary.txt").read_text()
    assert r.returncode not in (0, 122, 125), r.err + summary
    assert re.search(r"^build: +ok", summary, re.M)
    assert re.search(r"^check: +FAILED with status", summary, re.M)
    assert summary.splitlines()[-1] == f"FAIL: status {r.returncode}"
    assert (job / "results.tar.gz").is_file()


# --- an application appliance --------------------------------------------------------------------


def glpk_example(name: str) -> bytes:
    for directory in (Path("/usr/share/doc/glpk-utils/examples"),):
        path = directory / name
        if path.exists():
            return path.read_bytes()
    pytest.skip("GLPK is not installed natively on the host (apt-get install glpk-utils; make test does)")


MODELS = {
    "bad.mod": b"var x;\nmaximize z: x\nsubject to c: x <= ;\nend;\n",
    # Writes to stderr, then fails a check: glpsol's own stderr and a non-zero status.
    "stderr.mod": b'param n := 3;\nprintf "warning: n is %d\\n", n > "/dev/stderr";\ncheck n = 2;\nend;\n',
}


@BOTH_BACKENDS
@pytest.mark.parametrize(("model", "expected_rc"), [("assign.mod", 0), ("bad.mod", 1), ("stderr.mod", 1)])
def test_the_glpsol_wrapper_behaves_like_glpsol(
    cache_home: Path, tmp_path: Path, glpk_image: dict[str, object], backend: str, model: str, expected_rc: int
) -> None:
    """Same stdout, stderr, exit status and solution file as glpsol itself, under UML and QEMU."""
    content = MODELS[model] if model in MODELS else glpk_example(model)
    outputs = []
    for side in ("native", "appliance"):
        job = tmp_path / side
        job.mkdir()
        (job / model).write_bytes(content)
        argv = ["glpsol"] if side == "native" else [str(EXAMPLES / "glpk" / "glpsol-apppot")]
        env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PATH": f"{Path(APPPOT).parent}:{os.environ['PATH']}"}
        proc = subprocess.run(
            [*argv, "--math", model, "--output", "solution.txt"], cwd=job, env=env, capture_output=True, timeout=300
        )
        solution = (job / "solution.txt").read_bytes() if (job / "solution.txt").exists() else None
        outputs.append((proc.returncode, timeless(proc.stdout), proc.stderr, solution))
    assert outputs[0][0] == expected_rc
    assert (model != "stderr.mod") or outputs[0][2] == b"warning: n is 3\n"
    assert outputs[1] == outputs[0]


def timeless(output: bytes) -> bytes:
    """glpsol's output without the lines that may differ between two runs of the same input."""
    return re.sub(rb"^(Time used|Memory used):.*$", b"", output, flags=re.M)


def test_the_glpk_autorun_solves_the_models_in_the_job_directory(apppot, jobdir: Path, glpk_image: dict[str, object]) -> None:
    (jobdir / "assign.mod").write_bytes(glpk_example("assign.mod"))
    r = apppot(["start", "--image", "glpk"], cwd=jobdir)
    assert r.returncode == 0, r.err
    assert b"== assign.mod" in r.stdout and b"OPTIMAL LP SOLUTION FOUND" in r.stdout
    assert b"Objective:  obj = 76 (MINimum)" in (jobdir / "assign.sol").read_bytes()
    (jobdir / "assign.mod").unlink()
    (jobdir / "assign.sol").unlink()
    r = apppot(["start", "--image", "glpk"], cwd=jobdir)
    assert r.returncode == 2 and b"no *.mod model in the job directory" in r.stderr


# --- a full boot ---------------------------------------------------------------------------------


def test_a_full_boot_runs_the_job_after_the_systems_services(apppot, jobdir: Path, debian_services: dict[str, object]) -> None:
    script = "cat /proc/1/comm; systemctl is-active cron systemd-journald; echo out; echo err >&2; exit 7"
    r = apppot(["start", "--image", "debian-services", "--full-boot", "--", "sh", "-c", script], cwd=jobdir)
    assert (r.returncode, r.stdout, r.stderr) == (7, b"systemd\nactive\nactive\nout\n", b"err\n")
    # The same image without --full-boot: the agent is init, no daemons.
    r = apppot(["start", "--image", "debian-services", "--", "sh", "-c", "cat /proc/1/comm"], cwd=jobdir)
    assert (r.returncode, r.stdout) == (0, b"apppot-init\n"), r.err


def test_a_full_boot_of_an_image_without_systemd_is_refused(apppot, jobdir: Path) -> None:
    r = apppot(["start", "--full-boot", "--", "true"], cwd=jobdir)
    assert r.returncode == 125
    assert "--full-boot needs systemd" in r.err and "lacks /usr/lib/systemd/systemd" in r.err

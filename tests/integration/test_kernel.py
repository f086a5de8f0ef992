"""AppPot's own kernel: which kernel is chosen, what it can do on this host, and the build's reuse path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import APPPOT


@pytest.fixture
def uml_kernel() -> Iterator[None]:
    """These tests choose kernels themselves: not parametrised, no APPPOT_KERNEL."""
    yield None


@pytest.fixture
def cache_with_own_kernel(tmp_path: Path, own_kernel: Path) -> Path:
    """An XDG cache laid out as `apppot kernel build` leaves it."""
    cache = tmp_path / "cache"
    kernels = cache / "apppot" / "kernels"
    kernels.mkdir(parents=True)
    shutil.copytree(own_kernel.parent, kernels / own_kernel.parent.name)
    (kernels / "default").symlink_to(own_kernel.parent.name)
    return cache


def apppot_json(args: list[str], cache: Path, **env: str) -> dict[str, object]:
    full_env = {k: v for k, v in os.environ.items() if k != "APPPOT_KERNEL"} | {"XDG_CACHE_HOME": str(cache), **env}
    proc = subprocess.run([APPPOT, *args, "--json"], env=full_env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def test_own_kernel_is_the_default_and_runs_in_seccomp_mode(cache_with_own_kernel: Path) -> None:
    info = apppot_json(["kernel", "info"], cache_with_own_kernel)
    assert info["chosen_by"] == "apppot"
    assert str(info["path"]).startswith(str(cache_with_own_kernel))
    assert info["seccomp_supported"] is True and info["seccomp_on_this_host"] is True
    assert isinstance(info["lpj"], int) and info["lpj"] > 0
    assert info["network"] == "vde slirp plugin"
    for key in ("release", "source_package", "source_version", "suite", "config_hash", "build_date"):
        assert info[key], key


def test_precedence_option_over_environment_over_own_over_debian(cache_with_own_kernel: Path, tmp_path: Path) -> None:
    debian = shutil.which("linux")
    assert debian is not None
    by_env = apppot_json(["kernel", "info"], cache_with_own_kernel, APPPOT_KERNEL=debian)
    assert by_env["chosen_by"] == "APPPOT_KERNEL" and by_env["seccomp_supported"] is False
    by_option = apppot_json(["kernel", "info", "--kernel", debian], cache_with_own_kernel, APPPOT_KERNEL="/nonexistent")
    assert by_option["chosen_by"] == "--kernel"
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    assert apppot_json(["kernel", "info"], empty)["chosen_by"] == "debian"


def test_a_job_boots_with_seccomp_and_the_measured_lpj(cache_with_own_kernel: Path, tmp_path: Path) -> None:
    info = apppot_json(["kernel", "info"], cache_with_own_kernel)
    env = {k: v for k, v in os.environ.items() if k != "APPPOT_KERNEL"} | {"XDG_CACHE_HOME": str(cache_with_own_kernel)}
    job = tmp_path / "job"
    job.mkdir()
    proc = subprocess.run(
        [APPPOT, "start", "-v", "--", "sh", "-c", "uname -r"], cwd=job, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == info["release"]
    assert "seccomp mode" in proc.stderr
    running = next(line for line in proc.stderr.splitlines() if line.startswith("apppot: running:") and " ubd0=" in line)
    # seccomp=on (not auto) is fatal where seccomp does not work, so the job's success proves the mode.
    assert " seccomp=on " in running and f" lpj={info['lpj']} " in running


def test_ptrace_mode_is_a_parameter_away(cache_with_own_kernel: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "APPPOT_KERNEL"} | {"XDG_CACHE_HOME": str(cache_with_own_kernel)}
    job = tmp_path / "job"
    job.mkdir()
    proc = subprocess.run(
        [APPPOT, "start", "--extra", "seccomp=off", "--", "sh", "-c", "echo ptrace ok"],
        cwd=job,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (0, "ptrace ok\n"), proc.stderr


def test_build_finds_the_built_kernel_by_its_identity(cache_with_own_kernel: Path) -> None:
    """`apppot kernel build` looks the source up again (private apt lists) and reuses the matching build."""
    built = apppot_json(["kernel", "build"], cache_with_own_kernel)
    assert built["reused"] is True
    assert str(built["path"]).startswith(str(cache_with_own_kernel / "apppot" / "kernels"))
    assert (cache_with_own_kernel / "apppot" / "kernels" / "apt" / "lists").is_dir()


def test_without_the_mirror_the_kernel_already_built_is_kept(cache_with_own_kernel: Path) -> None:
    unreachable = "http://127.0.0.1:9/debian"  # nothing listens on the discard port
    built = apppot_json(["kernel", "build"], cache_with_own_kernel, APPPOT_DEBIAN_MIRROR=unreachable)
    assert built["reused"] is True
    assert str(built["path"]).startswith(str(cache_with_own_kernel / "apppot" / "kernels"))

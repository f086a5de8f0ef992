"""Every integration test runs on AppPot's own kernel and on Debian's `linux` (unless its module
says otherwise); appliances built from the example recipes are shared by the whole session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apppot.kernel_build import PrivateApt
from tests.conftest import APPPOT, ROOT, TEST_USER, Result, open_to_all

OWN_KERNEL_ENV = "APPPOT_TEST_KERNEL"  # a kernel built by `apppot kernel build`; default: the user's cache
REQUIRE_ENV = "APPPOT_TEST_REQUIRE_OWN_KERNEL"  # set by `make test`: a missing kernel fails instead of skipping


def _built_kernel() -> Path | None:
    if os.environ.get(OWN_KERNEL_ENV):
        return Path(os.environ[OWN_KERNEL_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidate = cache / "apppot" / "kernels" / "default" / "linux"
    return candidate.resolve() if candidate.exists() else None


@pytest.fixture(scope="session")
def own_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AppPot's kernel with its build record, copied where the unprivileged test user can read it."""
    built = _built_kernel()
    if built is None:
        message = "AppPot's kernel is not built: run 'apppot kernel build' (make test does)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)
    target = tmp_path_factory.mktemp("own-kernel") / built.parent.name
    shutil.copytree(built.parent, target)
    for p in [target, target.parent]:
        os.chmod(p, 0o755)
    return target / "linux"


@pytest.fixture(scope="session")
def debian_kernel() -> Path:
    found = shutil.which("linux")
    if found is None:
        pytest.skip("Debian's user-mode-linux is not installed")
    return Path(found).resolve()


@contextlib.contextmanager
def running_testbed(
    directory: Path, env: dict[str, str], up_args: list[str], stops: str, cwd: Path | None = None
) -> Iterator[str]:
    """`apppot testbed up UP_ARGS` (run in cwd) in directory (open to the test user), its stdout; `down`
    at the end, which must say it stopped `stops`."""
    started = time.monotonic()
    up = subprocess.run([APPPOT, "testbed", "up", *up_args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert up.returncode == 0, up.stderr
    print(f"testbed {' '.join(up_args)} up in {time.monotonic() - started:.1f} s")
    open_to_all(directory)
    try:
        yield up.stdout
    finally:
        down = subprocess.run([APPPOT, "testbed", "down"], env=env, capture_output=True, text=True, check=False)
        assert down.returncode == 0, down.stderr
        assert stops in down.stderr


@pytest.fixture
def own_kernel_only(own_kernel: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A module that says `uml_kernel = own_kernel_only` runs on AppPot's kernel only, not on both
    (the kernel matrix is the `apppot start` suite's)."""
    monkeypatch.setenv("APPPOT_KERNEL", str(own_kernel))
    yield own_kernel


@pytest.fixture(scope="session")
def guest_kernel_cache(cache_home: Path) -> Path:
    """Debian's kernel for QEMU guests in the session's cache: a copy of the user's if fetched before,
    else fetched there (test_qemu fetches one into an empty cache, in any case)."""
    target = cache_home / "apppot" / "guest-kernel"
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apppot" / "guest-kernel"
    if not target.exists():
        if (user / "current").exists():
            shutil.copytree(user, target, ignore=shutil.ignore_patterns("apt", "*.tmp"))
        else:
            fetch = "from apppot import guest_kernel; guest_kernel.fetch(print)"
            env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
            subprocess.run([str(Path(APPPOT).with_name("python")), "-c", fetch], env=env, check=True, capture_output=True)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend `apppot start` uses in the test (BOTH_BACKENDS): QEMU under TCG emulation, whatever
    the host's KVM does (test_qemu probes it), on one of the two UML kernel parametrisations."""
    name: str = getattr(request, "param", "uml")
    if name == "qemu":
        if request.node.callspec.params.get("uml_kernel") == "debian-kernel":
            pytest.skip("the QEMU backend does not use the UML kernel: it runs once, with the apppot-kernel set")
        request.getfixturevalue("guest_kernel_cache")
        monkeypatch.setenv("APPPOT_BACKEND", "qemu")
        monkeypatch.setenv("APPPOT_KVM", "0")
    return name


BOTH_BACKENDS = pytest.mark.parametrize("backend", ["uml", "qemu"], indirect=True)


@pytest.fixture(params=["apppot-kernel", "debian-kernel"], autouse=True)
def uml_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The kernel every `apppot` the test runs uses (through APPPOT_KERNEL)."""
    kernel: Path = request.getfixturevalue("own_kernel" if request.param == "apppot-kernel" else "debian_kernel")
    monkeypatch.setenv("APPPOT_KERNEL", str(kernel))
    yield kernel


# --- appliances built from recipes, once per session -------------------------------------------

EXAMPLES = ROOT / "examples"


def apppot_cli(cache_home: Path, *args: str, cwd: Path | None = None, timeout: float = 900) -> Result:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    proc = subprocess.run([APPPOT, *args], cwd=cwd, env=env, capture_output=True, timeout=timeout, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def build(cache_home: Path, recipe: Path) -> dict[str, object]:
    if os.geteuid() != 0:
        pytest.skip("building Debian appliances needs root (make test runs as root in CI)")
    r = apppot_cli(cache_home, "image", "build", "--json", str(recipe))
    assert r.returncode == 0, r.err
    record: dict[str, object] = json.loads(r.stdout)
    images = cache_home / "apppot" / "images"
    for p in (cache_home / "apppot", images):
        os.chmod(p, 0o755)  # the unprivileged test user reads the session's images
    return record


@pytest.fixture(scope="session")
def debian_dev(cache_home: Path) -> dict[str, object]:
    return build(cache_home, EXAMPLES / "debian-dev.toml")


@pytest.fixture(scope="session")
def glpk_image(cache_home: Path) -> dict[str, object]:
    return build(cache_home, EXAMPLES / "glpk" / "glpk.toml")


@pytest.fixture(scope="session")
def hello_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GNU hello's release tarball, as Debian's source package carries it (apt-get source, private apt)."""
    d = tmp_path_factory.mktemp("hello-source")
    return PrivateApt(d / "apt", "bookworm").upstream_tarball("hello", d)


@pytest.fixture(scope="session")
def debian_services(cache_home: Path) -> dict[str, object]:
    return build(cache_home, EXAMPLES / "debian-services.toml")


# --- the unprivileged test user on the test cluster (apppot testbed) -----------------------------


class SiteUser:
    """The unprivileged test user running the testbed's own copy of AppPot (site/bin/apppot)."""

    def __init__(self, testbed: Path, home: Path, cache: Path, wait_timeout: float = 120, run_timeout: float = 120) -> None:
        site = testbed / "site"
        self.home = home
        self.apppot = str(site / "bin" / "apppot")
        self.wait_timeout = wait_timeout
        self.run_timeout = run_timeout
        self.env = {
            "PATH": f"{site / 'bin'}:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(home),
            "XDG_CACHE_HOME": str(cache),
            "SLURM_CONF": str(testbed / "etc" / "slurm.conf"),
            "APPPOT_KERNEL": str(site / "kernel" / "linux"),
        }

    def run(self, *args: str, cwd: Path) -> Result:
        argv = ["setpriv", f"--reuid={TEST_USER}", f"--regid={TEST_USER}", "--init-groups", "--", self.apppot, *args]
        proc = subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, timeout=self.run_timeout, check=False)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def wait(self, job_id: str, cwd: Path) -> dict[str, object]:
        """The job's final status (apppot status --json), polled."""
        deadline = time.monotonic() + self.wait_timeout
        while time.monotonic() < deadline:
            r = self.run("status", "--json", job_id, cwd=cwd)
            assert r.returncode == 0, r.err
            status: dict[str, object] = json.loads(r.stdout)
            if status["final"]:
                return status
            time.sleep(0.3)
        pytest.fail(f"{job_id} did not finish in {self.wait_timeout:.0f} s")

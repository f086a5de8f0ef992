"""Every integration test runs on AppPot's own kernel and on Debian's `linux` (unless its module
says otherwise); appliances built from the example recipes are shared by the whole session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import APPPOT, ROOT, Result

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


@pytest.fixture(params=["apppot-kernel", "debian-kernel"], autouse=True)
def uml_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The kernel every `apppot` the test runs uses (through APPPOT_KERNEL)."""
    kernel: Path = request.getfixturevalue("own_kernel" if request.param == "apppot-kernel" else "debian_kernel")
    monkeypatch.setenv("APPPOT_KERNEL", str(kernel))
    yield kernel


# --- appliances built from recipes, once per session -------------------------------------------

EXAMPLES = ROOT / "examples"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = os.environ.get("APPPOT_DEBIAN_MIRROR") or "http://deb.debian.org/debian"


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
    for sub in ("sources", "lists/partial", "cache/archives/partial", "download"):
        (d / sub).mkdir(parents=True)
    (d / "sources" / "src.sources").write_text(
        f"Types: deb-src\nURIs: {MIRROR}\nSuites: bookworm\nComponents: main\nSigned-By: {KEYRING}\n"
    )
    options = [
        "-o", "Dir::Etc::SourceList=/dev/null",
        "-o", f"Dir::Etc::SourceParts={d / 'sources'}",
        "-o", f"Dir::State::Lists={d / 'lists'}",
        "-o", f"Dir::Cache={d / 'cache'}",
    ]  # fmt: skip
    if os.geteuid() == 0:
        options += ["-o", "APT::Sandbox::User=root"]
    subprocess.run(["apt-get", *options, "update", "-qq"], check=True, capture_output=True)
    subprocess.run(
        ["apt-get", *options, "source", "--download-only", "hello"], cwd=d / "download", check=True, capture_output=True
    )
    (orig,) = (d / "download").glob("hello_*.orig.tar.gz")
    version = orig.name.removeprefix("hello_").removesuffix(".orig.tar.gz")
    return orig.rename(d / f"hello-{version}.tar.gz")


@pytest.fixture(scope="session")
def debian_services(cache_home: Path) -> dict[str, object]:
    return build(cache_home, EXAMPLES / "debian-services.toml")

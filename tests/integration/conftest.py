"""Every integration test runs on AppPot's own kernel and on Debian's `linux`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

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

"""Shared fixtures: the tiny appliance is built once per test session."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPPOT = str(Path(sys.executable).parent / "apppot")
TEST_USER = "apppot-test"


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An XDG cache shared by the whole session, readable by the test user."""
    path = tmp_path_factory.mktemp("xdg-cache")
    open_to_all(path)  # the unprivileged test user must reach the session's directories
    return path


def open_to_all(path: Path) -> None:
    """Make path and its parents up to the temporary directory readable and searchable by every user."""
    for p in [path, *path.parents]:
        if p == Path(tempfile.gettempdir()) or p == Path("/"):
            break
        os.chmod(p, 0o755)


@pytest.fixture(scope="session")
def tiny_image(cache_home: Path) -> Path:
    """The tiny default appliance, built once into the session's cache."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    subprocess.run([APPPOT, "image", "build-tiny"], env=env, check=True, capture_output=True)
    images = list((cache_home / "apppot" / "images").glob("tiny-*.img"))
    assert len(images) == 1
    os.chmod(cache_home / "apppot", 0o755)
    os.chmod(cache_home / "apppot" / "images", 0o755)
    return images[0]


@pytest.fixture
def jobdir(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    d.mkdir()
    return d


@pytest.fixture
def apppot(cache_home: Path, tiny_image: Path, tmp_path: Path):
    """Run `apppot` with the session's cache; returns a Result."""
    run_tmp = tmp_path / "run-tmp"
    run_tmp.mkdir()
    os.chmod(run_tmp, 0o1777)
    os.chmod(tmp_path, 0o755)

    def run(
        args: Sequence[str],
        *,
        cwd: Path | None = None,
        stdin: bytes | int | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        as_user: str | None = None,
        prefix: Sequence[str] = (),
    ) -> Result:
        # Console logs (the XDG state directory) go beside the cache, where the tests look for them.
        full_env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "XDG_STATE_HOME": str(cache_home), "TMPDIR": str(run_tmp)}
        full_env |= env or {}
        argv = [APPPOT, *args]
        if as_user is not None:
            # The user's own cache; the session's image, by path.
            user_cache = tmp_path / f"cache-{as_user}"
            user_cache.mkdir(exist_ok=True)
            chown_to(user_cache, as_user)
            for variable in ("XDG_CACHE_HOME", "XDG_STATE_HOME"):
                if variable not in (env or {}):
                    full_env[variable] = str(user_cache)
            guest_kernel = cache_home / "apppot" / "guest-kernel"  # QEMU's, if the session has it
            if guest_kernel.exists() and not (user_cache / "apppot" / "guest-kernel").exists():
                (user_cache / "apppot").mkdir(exist_ok=True)
                chown_to(user_cache / "apppot", as_user)
                (user_cache / "apppot" / "guest-kernel").symlink_to(guest_kernel)
            full_env.setdefault("APPPOT_IMAGE", str(tiny_image))
            argv = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--init-groups", "--", *argv]
            full_env["HOME"] = pwd.getpwnam(as_user).pw_dir
        argv = [*prefix, *argv]  # e.g. a private mount namespace made as root, before dropping to the user
        input_bytes = stdin if isinstance(stdin, bytes) else None
        stdin_arg = stdin if isinstance(stdin, int) else (None if input_bytes is not None else subprocess.DEVNULL)
        proc = subprocess.run(
            argv,
            cwd=cwd,
            input=input_bytes,
            stdin=stdin_arg,
            capture_output=True,
            env=full_env,
            timeout=timeout,
            check=False,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    run.tmp = run_tmp  # type: ignore[attr-defined]
    return run


@pytest.fixture
def test_user() -> Iterator[str]:
    """An unprivileged host user (made by `make test` when run as root)."""
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.skip(f"no user {TEST_USER}: run the tests through 'make test' as root")
    if os.getuid() != 0:
        pytest.skip("switching to the test user needs root")
    yield TEST_USER


def chown_to(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    shutil.chown(path, pw.pw_uid, pw.pw_gid)

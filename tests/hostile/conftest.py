"""The hostile-guest suite: jobs that attack the host, run as the unprivileged user apppot-test.

Every test runs an attack through `Attack`, which puts canary files next to the job
directory, in the user's home and in /tmp, and afterwards checks their bytes, that
AppPot printed no traceback and did not hang, and that no process and no run
directory of the job is left.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import APPPOT, Result, chown_to, open_to_all
from tests.integration.conftest import (  # noqa: F401  (fixtures the suite shares with the integration tests)
    BOTH_BACKENDS,
    backend,
    debian_kernel,
    own_kernel,
    uml_kernel,
)
from tests.integration.conftest import (
    guest_kernel_cache as guest_kernel_cache,
)

pytestmark = pytest.mark.uml

PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"  # a plain user's: no /usr/sbin
HANG_BOUND_S = 60.0  # an attack that makes AppPot wait longer is a hang
EXIT_GUEST_MISBEHAVED = 122


@dataclass
class Outcome:
    result: Result
    seconds: float
    canaries: dict[Path, bytes] = field(default_factory=dict)

    @property
    def err(self) -> str:
        return self.result.err

    @property
    def returncode(self) -> int:
        return self.result.returncode

    def one_line(self, *needles: str) -> str:
        """The one line AppPot said (prefixed apppot:) holding every needle."""
        lines = [line for line in self.err.splitlines() if line.startswith("apppot:") and all(n in line for n in needles)]
        assert len(lines) == 1, self.err
        return lines[0]


class Attack:
    """Runs jobs as the test user and checks what they must never do."""

    def __init__(self, apppot, user: str, tmp_path: Path) -> None:
        self.apppot = apppot
        self.user = user
        open_to_all(tmp_path)
        self.jobdir = tmp_path / "job"
        self.jobdir.mkdir()
        chown_to(self.jobdir, user)
        home = Path(pwd.getpwnam(user).pw_dir)
        tag = secrets.token_hex(4)
        self.canaries = {
            tmp_path / "next-to-job.txt": b"NEXT-TO-JOB 7\n",
            home / f"hostile-canary-{tag}.txt": b"IN-HOME 7\n",
            Path(f"/tmp/hostile-canary-{tag}.txt"): b"IN-TMP 7\n",
        }
        for path, data in self.canaries.items():
            path.write_bytes(data)
            chown_to(path, user)  # the user may write it: only AppPot's care keeps it intact
        self.instance = f"hostile-{tag}"

    @property
    def canary(self) -> Path:
        """The canary in the user's home: the target the attacks aim at."""
        return list(self.canaries)[1]

    def run(self, args: list[str], *, stdin: bytes | int | None = None, env: dict[str, str] | None = None) -> Outcome:
        if "--" in args and "--id" not in args:
            at = args.index("--")
            args = [*args[:at], "--id", self.instance, *args[at:]]
        started = time.monotonic()
        env = {"PATH": PLAIN_PATH, **(env or {})}
        result = self.apppot(args, cwd=self.jobdir, stdin=stdin, env=env, as_user=self.user, timeout=HANG_BOUND_S)
        outcome = Outcome(result, time.monotonic() - started)
        self.check_host(outcome)
        return outcome

    def spawn(self, args: list[str], image: Path, cache_name: str) -> subprocess.Popen[bytes]:
        """`apppot ARGS` as the user in the background, with a cache of its own, for a test that signals it."""
        cache = self.jobdir.parent / cache_name
        cache.mkdir()
        chown_to(cache, self.user)
        env = {**os.environ, "PATH": PLAIN_PATH, "TMPDIR": str(self.apppot.tmp), "XDG_CACHE_HOME": str(cache)}
        env["XDG_STATE_HOME"] = str(cache)  # its console log, beside the cache
        env |= {"APPPOT_IMAGE": str(image), "HOME": home_of(self.user)}
        argv = ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", "--", APPPOT, *args]
        return subprocess.Popen(argv, cwd=self.jobdir, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def check_host(self, outcome: Outcome) -> None:
        assert "Traceback" not in outcome.err, outcome.err
        for path, data in self.canaries.items():
            assert path.read_bytes() == data, f"{path} was changed"
        left = [p.name for p in self.apppot.tmp.iterdir() if p.name.startswith("apppot-")]
        assert left == [], f"run directories left: {left}"
        assert self.processes() == [], "processes outlived the job"

    def processes(self) -> list[str]:
        found = subprocess.run(["pgrep", "-a", "-f", self.instance], capture_output=True, text=True, check=False).stdout
        return [line for line in found.splitlines() if "pgrep" not in line]

    def cleanup(self) -> None:
        for path in self.canaries:
            path.unlink(missing_ok=True)


@pytest.fixture
def attack(request: pytest.FixtureRequest, apppot, test_user: str, tmp_path: Path) -> Iterator[Attack]:
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "qemu":
        request.getfixturevalue("qemu_files_made")
    a = Attack(apppot, test_user, tmp_path)
    yield a
    a.cleanup()


@pytest.fixture(scope="session")
def qemu_files_made(cache_home: Path, guest_kernel_cache: Path) -> None:
    """The test user's cache links to the session's guest kernel, which it cannot write: a first QEMU job
    as root makes what QEMU boots (vmlinux, the initramfs) beside it."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "APPPOT_BACKEND": "qemu", "APPPOT_KVM": "0"}
    job = cache_home / "warm-up"
    job.mkdir(exist_ok=True)
    subprocess.run([APPPOT, "start", "--", "true"], cwd=job, env=env, check=True, capture_output=True, timeout=120)
    for path in guest_kernel_cache.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(params=["job-user", "root-inside"])
def inside(request: pytest.FixtureRequest) -> list[str]:
    """The job's user inside the guest: the host user's own ids, or root."""
    return ["--user", "root"] if request.param == "root-inside" else []


def home_of(user: str) -> str:
    return pwd.getpwnam(user).pw_dir


__all__ = ["BOTH_BACKENDS", "EXIT_GUEST_MISBEHAVED", "Attack", "Outcome", "home_of", "os"]

"""The seed's users, as they are: an unprivileged host user with a plain environment (`env -i`, Debian's
PATH for ordinary users, no /usr/sbin) running seed command lines and the README's first job."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.conftest import APPPOT, TEST_USER, Result, chown_to, open_to_all
from tests.integration.test_snap import hand_made_archive

pytestmark = pytest.mark.uml

PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"  # Debian's PATH for an ordinary user: no /usr/sbin, no /sbin
APPPOT_START = str(Path(APPPOT).with_name("apppot-start"))


SEED_BASE = "5eed" * 16  # a base id: 64 lower-case hex digits, as apppot-snap records


@pytest.fixture(autouse=True)
def uml_kernel() -> None:
    """Each test here says which kernel its user has (not the suite's two-kernel matrix)."""


@pytest.fixture
def plain_home(tmp_path: Path, test_user: str) -> Path:
    """A new user's empty home: no cache, no configuration."""
    home = tmp_path / "home"
    home.mkdir()
    chown_to(home, test_user)
    open_to_all(home)
    return home


def as_plain_user(home: Path, argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> Result:
    """argv as the test user with only HOME and a plain PATH (plus env), as `env -i` gives."""
    full_env = {"HOME": str(home), "PATH": PLAIN_PATH, **(env or {})}
    setpriv = ["/usr/bin/setpriv", f"--reuid={TEST_USER}", f"--regid={TEST_USER}", "--init-groups", "--"]
    proc = subprocess.run(
        [*setpriv, *argv], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, capture_output=True, timeout=300, check=False
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_a_seed_command_line_without_double_dash_keeps_the_commands_own(
    plain_home: Path, tiny_image: Path, own_kernel: Path, test_user: str
) -> None:
    job = plain_home / "job"
    job.mkdir()
    (job / "f.txt").write_text("seedword\nother\nseedword again\n")
    for path in (job, job / "f.txt"):
        chown_to(path, test_user)
    env = {"APPPOT_KERNEL": str(own_kernel)}  # the site's kernel, as the grid's runtime environment names it
    # A base to merge onto, recorded in the job's COW (the tiny appliance has none of its own).
    record = f"mkdir -p /var/lib/apppot && echo {SEED_BASE} > /var/lib/apppot/base.id"
    seed_image = ["--apppot", f"job.cow,{tiny_image}"]
    r = as_plain_user(plain_home, [APPPOT_START, *seed_image, "--user", "root", "--", "sh", "-c", record], job, env)
    assert r.returncode == 0, r.err
    hand_made_archive(job / "c.tar.gz", SEED_BASE, [("etc/seed.txt", b"seedword from the archive\n")])
    chown_to(job / "c.tar.gz", test_user)

    options = [*seed_image, "--changes", "c.tar.gz", "--mem", "256M", "--extra", "seedword=1"]
    files = ["f.txt", "/etc/seed.txt", "/proc/cmdline"]  # the job's file, the archive's, the kernel's parameters
    r = as_plain_user(plain_home, [APPPOT_START, *options, "grep", "-c", "--", "seedword", *files], job, env)
    assert (r.returncode, r.stdout) == (0, b"f.txt:2\n/etc/seed.txt:1\n/proc/cmdline:1\n"), r.err
    r = as_plain_user(plain_home, [APPPOT, "start", *options, "grep", "-c", "--", "-absent-", "f.txt"], job, env)
    assert (r.returncode, r.stdout) == (1, b"0\n"), r.err  # grep's own status: no line matched


def test_the_readme_first_job_as_a_new_user_with_a_plain_path(plain_home: Path, test_user: str) -> None:
    """README, "Running a job", on first use: the default appliance is built into the user's empty
    cache (mkfs.ext4 and debugfs are in /usr/sbin) and the kernel is Debian's `linux` on PATH."""
    job = plain_home / "myjob"
    job.mkdir()
    (job / "input.dat").write_bytes(b"0123456789")
    chown_to(job, test_user)
    chown_to(job / "input.dat", test_user)
    r = as_plain_user(plain_home, [APPPOT, "start", "--", "sh", "-c", "wc -c < input.dat > result.txt; echo done"], job)
    assert (r.returncode, r.stdout) == (0, b"done\n"), r.err
    assert (job / "result.txt").read_text().strip() == "10"
    assert (job / "result.txt").stat().st_uid == os.stat(plain_home).st_uid
    assert list((plain_home / ".cache" / "apppot" / "images").glob("tiny-*.img")), "the default appliance is in the user's cache"


@pytest.mark.parametrize("command", [["--"], ["--", "echo", "ran"], ["-x"]])
def test_a_command_named_like_an_option_is_not_found_as_natively(
    plain_home: Path, tiny_image: Path, own_kernel: Path, test_user: str, command: list[str]
) -> None:
    """`apppot start -- -- echo ran`: the command is `-- echo ran`, which names no program (busybox's
    exec took the '--' as its own, ran `echo` or nothing, and the job 'succeeded')."""
    job = plain_home / "job"
    job.mkdir()
    chown_to(job, test_user)
    env = {"APPPOT_KERNEL": str(own_kernel), "APPPOT_IMAGE": str(tiny_image)}
    for user in ([], ["--user", "root"]):
        r = as_plain_user(plain_home, [APPPOT, "start", *user, "--", *command], job, env)
        assert (r.returncode, r.stdout) == (127, b""), (user, r.err)
        assert f"{command[0]}: not found" in r.err

"""Attacks on what the host reads or runs: the cache, the run directories, the COW, the job directory."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import APPPOT, chown_to
from tests.hostile.conftest import Attack, home_of


def test_a_relative_cache_home_is_ignored(attack: Attack) -> None:
    outcome = attack.run(["start", "--", "true"], env={"XDG_CACHE_HOME": "cache"})
    assert outcome.returncode == 0, outcome.err
    assert not (attack.jobdir / "cache").exists()


def test_a_job_directory_holding_the_cache_is_refused(attack: Attack) -> None:
    (attack.jobdir / "cache").mkdir()
    chown_to(attack.jobdir / "cache", attack.user)
    outcome = attack.run(["start", "--", "true"], env={"XDG_CACHE_HOME": str(attack.jobdir / "cache")})
    assert outcome.returncode == 125
    outcome.one_line("AppPot's cache", "inside the job directory")


def test_a_job_directory_holding_tmpdir_is_refused(attack: Attack) -> None:
    inside = attack.jobdir / "tmp"
    inside.mkdir()
    inside.chmod(0o1777)
    outcome = attack.run(["start", "--", "true"], env={"TMPDIR": str(inside)})
    assert outcome.returncode == 125
    outcome.one_line("TMPDIR", "inside the job directory")


def test_the_root_directory_and_the_home_are_refused(attack: Attack) -> None:
    for jobdir, says in (("/", "the root directory"), (home_of(attack.user), "your whole home directory")):
        outcome = attack.run(["start", "--jobdir", jobdir, "--", "true"])
        assert outcome.returncode == 125
        outcome.one_line(says, "--unsafe-jobdir")


def test_a_kernel_inside_the_job_directory_is_refused(attack: Attack) -> None:
    kernel = attack.jobdir / "linux"
    kernel.write_bytes(Path(os.environ["APPPOT_KERNEL"]).read_bytes())
    kernel.chmod(0o755)
    outcome = attack.run(["start", "--kernel", str(kernel), "--", "true"])
    assert outcome.returncode == 125
    outcome.one_line("the kernel", "inside the job directory")


def test_kept_files_are_private(attack: Attack, tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    chown_to(keep, attack.user)
    cow, log = keep / "job.cow", keep / "console.log"
    outcome = attack.run(["start", "--cow", str(cow), "--console-log", str(log), "--", "true"])
    assert outcome.returncode == 0, outcome.err
    assert cow.stat().st_mode & 0o777 == 0o600 and log.stat().st_mode & 0o777 == 0o600


def test_a_cow_whose_base_changed_with_its_mtime_put_back_is_refused(attack: Attack, tmp_path: Path, tiny_image: Path) -> None:
    image = tmp_path / "img" / "base.img"
    image.parent.mkdir()
    image.write_bytes(tiny_image.read_bytes())
    chown_to(image.parent, attack.user)
    chown_to(image, attack.user)
    cow = image.parent / "job.cow"
    outcome = attack.run(["start", "--image", str(image), "--cow", str(cow), "--", "true"])
    assert outcome.returncode == 0, outcome.err
    st = image.stat()
    with image.open("r+b") as f:  # a byte of unused space, as a user may change it
        f.seek(st.st_size - 1)
        f.write(b"\1")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    outcome = attack.run(["start", "--image", str(image), "--cow", str(cow), "--", "true"])
    assert outcome.returncode == 125
    outcome.one_line("before it changed", "ctime_ns")


def test_the_cow_keeps_its_base_without_the_sandbox(attack: Attack, tmp_path: Path, tiny_image: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    chown_to(keep, attack.user)
    cow = keep / "job.cow"
    outcome = attack.run(["start", "--image", str(tiny_image), "--cow", str(cow), "--", "true"])
    assert outcome.returncode == 0, outcome.err
    header = cow.read_bytes()[:4096]
    outcome = attack.run(["start", "--image", str(tiny_image), "--cow", str(cow), "--", "true"], env={"APPPOT_BWRAP": "/none"})
    assert outcome.returncode == 0, outcome.err
    assert cow.read_bytes()[:4096] == header  # UML saw the same base path, and rewrote nothing


def test_a_killed_apppot_leaves_nothing_after_the_next_start(attack: Attack, apppot, tiny_image: Path) -> None:
    cache = attack.jobdir.parent / "kill-cache"
    cache.mkdir()
    chown_to(cache, attack.user)
    env = {**os.environ, "TMPDIR": str(apppot.tmp), "XDG_CACHE_HOME": str(cache), "APPPOT_IMAGE": str(tiny_image)}
    env["HOME"] = home_of(attack.user)
    argv = ["setpriv", f"--reuid={attack.user}", f"--regid={attack.user}", "--init-groups", "--", APPPOT]
    proc = subprocess.Popen(
        [*argv, "start", "--id", attack.instance, "--", "sleep", "60"],
        cwd=attack.jobdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not any(p.name.startswith("apppot-") for p in apppot.tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert any(p.name.startswith("apppot-") for p in apppot.tmp.iterdir()), err
    deadline = time.monotonic() + 10
    while attack.processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    outcome = attack.run(["start", "--", "true"])  # check_host: the killed run's directory is gone too
    assert outcome.returncode == 0, outcome.err

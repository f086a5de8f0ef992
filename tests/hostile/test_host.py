"""Attacks on what the host reads or runs: the cache, the run directories, the COW, the job directory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import chown_to
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
    proc = attack.spawn(["start", "--id", attack.instance, "--", "sleep", "60"], tiny_image, "kill-cache")
    logs = attack.jobdir.parent / "kill-cache" / "apppot" / "logs"
    deadline = time.monotonic() + 30
    started = False  # its run directory and its console log exist (both come before the guest boots)
    while not started and time.monotonic() < deadline:
        time.sleep(0.1)
        started = any(p.name.startswith("apppot-") for p in apppot.tmp.iterdir()) and logs.is_dir() and any(logs.iterdir())
    time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert started and any(p.name.startswith("apppot-") for p in apppot.tmp.iterdir()), err
    deadline = time.monotonic() + 10
    while attack.processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(logs.iterdir())) == 1  # the killed run's console log
    kill_cache = str(attack.jobdir.parent / "kill-cache")
    outcome = attack.run(["start", "--", "true"], env={"XDG_CACHE_HOME": kill_cache, "XDG_STATE_HOME": kill_cache})
    assert outcome.returncode == 0, outcome.err  # check_host: its run directory is gone
    assert list(logs.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_apppot_within_3_seconds_whatever_the_guest_does(
    attack: Attack, tiny_image: Path, signum: signal.Signals
) -> None:
    # Root inside ignores the signals and keeps the guest's CPU busy: the host must not wait for it.
    script = "trap '' TERM INT HUP; while :; do :; done"
    proc = attack.spawn(
        ["start", "--user", "root", "--id", attack.instance, "--", "sh", "-c", script], tiny_image, "signal-cache"
    )
    time.sleep(3)  # booted, the pipe made
    started = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 3, err
    assert proc.returncode == 128 + signum, err
    assert b"Traceback" not in err
    outcome = attack.run(["start", "--", "true"])  # check_host: nothing left behind
    assert outcome.returncode == 0


def test_a_job_directory_inside_the_cache_is_refused(attack: Attack) -> None:
    # A job run in the cache could rewrite the list of host files the next job's sandbox binds.
    cache = attack.jobdir / "c"
    host = cache / "apppot" / "host"
    host.mkdir(parents=True)
    for path in (cache, cache / "apppot", host):
        chown_to(path, attack.user)
    outcome = attack.run(["start", "--jobdir", str(host), "--", "true"], env={"XDG_CACHE_HOME": str(cache)})
    assert outcome.returncode == 125
    outcome.one_line("inside AppPot's cache")


def test_links_a_job_left_in_its_directory_are_not_followed(attack: Attack) -> None:
    # An earlier job left links where the next one's console log, COW and changes archive go.
    outcome = attack.run(["start", "--", "sh", "-c", f"ln -s {attack.canary} log; ln -s {attack.canary} c.cow; exit 0"])
    assert outcome.returncode == 0, outcome.err
    outcome = attack.run(["start", "--console-log", "log", "--", "true"])
    assert outcome.returncode == 125
    outcome.one_line("console log", "symbolic link")
    outcome = attack.run(["start", "--cow", "c.cow", "--", "true"])
    assert outcome.returncode == 125
    outcome.one_line("--cow", "symbolic link")
    outcome = attack.run(["start", "--", "sh", "-c", f"ln -s {attack.canary} apppot-changes.tar.gz"])
    outcome = attack.run(["start", "--", "true"])
    assert outcome.returncode == 125
    outcome.one_line("apppot-changes.tar.gz", "symbolic link")

"""The test cluster on a shared host: its state directory is refused unless only its owner (root) can
change it, and `down` signals a PID only if it is the daemon it expects. Run as root (make test): the
other user is the unprivileged test user; `down` runs through the CLI with no daemon started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from apppot.errors import HostError
from apppot.testbed import arc, daemons, slurm, statedir
from apppot.testbed.slurm import LocalCluster
from tests.conftest import APPPOT, chown_to

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the testbed's checks are about root's use (run as root)")


@pytest.fixture
def safe_tmp(tmp_path: Path) -> Path:
    """tmp_path, reached only through directories root owns."""
    for p in [tmp_path, *tmp_path.parents]:
        st = p.lstat()
        assert st.st_uid == 0 and (not st.st_mode & 0o022 or st.st_mode & 0o1000), p
    return tmp_path


def refusal(directory: Path) -> str:
    with pytest.raises(HostError) as caught:
        statedir.prepare(directory)
    message = str(caught.value)
    assert "\n" not in message and "APPPOT_TESTBED_DIR" in message
    return message


# --- the state directory -------------------------------------------------------------------------


def test_a_missing_state_directory_is_made_0755_whatever_the_umask(safe_tmp: Path) -> None:
    umask = os.umask(0o077)
    try:
        made = statedir.prepare(safe_tmp / "bed")
    finally:
        os.umask(umask)
    assert made == safe_tmp / "bed" and (made.stat().st_mode & 0o7777, made.stat().st_uid) == (0o755, 0)


def test_a_state_directory_another_user_made_first_is_refused(safe_tmp: Path, test_user: str) -> None:
    bed = safe_tmp / "bed"
    bed.mkdir(mode=0o755)
    chown_to(bed, test_user)
    assert f"belongs to {test_user}, not to root" in refusal(bed)
    assert statedir.existing(safe_tmp) == safe_tmp  # its parent is fine


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_a_state_directory_others_can_write_to_is_refused(safe_tmp: Path, mode: int) -> None:
    bed = safe_tmp / "bed"
    bed.mkdir()
    bed.chmod(mode)
    assert f"writable by other users (mode {mode:04o})" in refusal(bed)


def test_a_state_directory_that_is_a_link_is_refused(safe_tmp: Path) -> None:
    (safe_tmp / "real").mkdir(mode=0o755)
    (safe_tmp / "bed").symlink_to(safe_tmp / "real")
    assert "is a symbolic link" in refusal(safe_tmp / "bed")
    (safe_tmp / "file").write_text("")
    assert "is not a directory" in refusal(safe_tmp / "file")


def test_a_state_directory_inside_another_users_directory_is_refused(safe_tmp: Path, test_user: str) -> None:
    theirs = safe_tmp / "theirs"
    (theirs / "bed").mkdir(parents=True)
    chown_to(theirs, test_user)  # they could rename bed and put their own in its place
    assert f"inside {theirs}, which belongs to {test_user}" in refusal(theirs / "bed")


def test_a_state_directory_inside_a_world_writable_one_is_refused_unless_sticky(safe_tmp: Path) -> None:
    shared = safe_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert f"inside {shared}, which other users can write to" in refusal(shared / "bed")
    shared.chmod(0o1777)  # like /tmp: nobody else can rename or remove what root made in it
    assert statedir.prepare(shared / "bed") == shared / "bed"


def test_a_relative_state_directory_is_taken_from_the_current_one(safe_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(safe_tmp)
    monkeypatch.setenv("APPPOT_TESTBED_DIR", "Bed-APPS")
    assert statedir.prepare(statedir.testbed_dir()) == safe_tmp / "Bed-APPS"
    monkeypatch.delenv("APPPOT_TESTBED_DIR")
    assert statedir.testbed_dir() == Path("/var/lib/apppot-testbed")


def test_a_state_directory_in_a_missing_one_is_refused(safe_tmp: Path) -> None:
    with pytest.raises(HostError, match="is not a directory: make it"):
        statedir.prepare(safe_tmp / "missing" / "bed")
    assert statedir.existing(safe_tmp / "missing" / "bed") is None  # down: nothing to stop


@pytest.mark.parametrize("name", ["with space", "quote'", "per%cent", "new\nline", "dollar$"])
def test_a_state_directory_slurm_or_arc_cannot_name_is_refused(safe_tmp: Path, name: str) -> None:
    with pytest.raises(HostError, match="letters, digits"):
        statedir.prepare(safe_tmp / name)
    assert not (safe_tmp / name).exists()


def test_nothing_the_cluster_configuration_writes_is_writable_by_others(safe_tmp: Path) -> None:
    bed = LocalCluster(statedir.prepare(safe_tmp / "bed"), 2)
    umask = os.umask(0)  # a careless caller's
    try:
        slurm.write_config(bed)
    finally:
        os.umask(umask)
    assert bed.jobcomp.stat().st_mode & 0o777 == 0o644  # was 0666: anyone could forge a job's result
    for path in [bed.directory, *bed.directory.rglob("*")]:
        assert not path.stat().st_mode & 0o022, path
    assert f"MinJobAge={slurm.JOB_MEMORY}" in bed.conf.read_text()


# --- pid files -----------------------------------------------------------------------------------


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def start(processes: list[subprocess.Popen[bytes]], program: Path, user: str | None = None) -> int:
    """A process that sleeps, whose executable is program (a copy of sleep)."""
    if not program.exists():
        shutil.copy(shutil.which("sleep") or "/bin/sleep", program)
        program.chmod(0o755)
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"] if user else []
    proc = subprocess.Popen([*prefix, str(program), "300"])
    processes.append(proc)
    return proc.pid


def alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def down(bed: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APPPOT_TESTBED_DIR": str(bed)}
    return subprocess.run([APPPOT, "testbed", "down"], env=env, capture_output=True, text=True, timeout=60, check=False)


def bed_with_pid_file(safe_tmp: Path, name: str, pid: int) -> Path:
    bed = statedir.prepare(safe_tmp / "bed")
    (bed / "run").mkdir(exist_ok=True)
    (bed / "run" / name).write_text(f"{pid}\n")
    return bed


def test_down_leaves_an_unrelated_process_a_pid_file_names_alone(
    safe_tmp: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    pid = start(processes, safe_tmp / "sleep")
    bed = bed_with_pid_file(safe_tmp, "slurmctld.pid", pid)
    r = down(bed)
    assert r.returncode == 0, r.stderr
    assert alive(processes[0])
    assert f"slurmctld: pid {pid} is sleep, not slurmctld; left it alone" in r.stderr
    assert "stopped nothing" in r.stderr


def test_down_stops_the_daemon_its_pid_file_names(safe_tmp: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    pid = start(processes, safe_tmp / "slurmctld")  # its executable's name is the daemon's
    bed = bed_with_pid_file(safe_tmp, "slurmctld.pid", pid)
    r = down(bed)
    assert r.returncode == 0, r.stderr
    processes[0].wait(timeout=5)
    assert "stopped slurmctld" in r.stderr and not (bed / "run" / "slurmctld.pid").exists()


def test_down_leaves_the_program_alone_when_another_user_runs_it(
    safe_tmp: Path, processes: list[subprocess.Popen[bytes]], test_user: str
) -> None:
    pid = start(processes, safe_tmp / "slurmd", user=test_user)
    bed = bed_with_pid_file(safe_tmp, "slurmd-n1.pid", pid)
    r = down(bed)
    assert alive(processes[0]) and r.returncode == 0, r.stderr
    assert f"pid {pid} is slurmd run by uid" in r.stderr


def test_a_pid_file_another_user_could_write_is_not_trusted(
    safe_tmp: Path, processes: list[subprocess.Popen[bytes]], test_user: str
) -> None:
    pid = start(processes, safe_tmp / "slurmctld")
    bed = bed_with_pid_file(safe_tmp, "slurmctld.pid", pid)
    pid_file = bed / "run" / "slurmctld.pid"
    chown_to(pid_file, test_user)
    assert isinstance(daemons.read_pid_file(pid_file, 0), str)
    pid_file.chmod(0o666)
    chown_to(pid_file, "root")
    assert "could have been written by another user" in str(daemons.read_pid_file(pid_file, 0))
    pid_file.unlink()
    pid_file.symlink_to(safe_tmp / "elsewhere")
    assert "cannot be opened safely" in str(daemons.read_pid_file(pid_file, 0))
    pid_file.unlink()
    for junk in ("", "12 13", "-1", "1", "9" * 40, "\x00\xff"):
        pid_file.write_text(junk)
        assert "does not hold a PID" in str(daemons.read_pid_file(pid_file, 0)), junk
    assert alive(processes[0])


def test_down_refuses_a_state_directory_another_user_made(safe_tmp: Path, test_user: str) -> None:
    bed = safe_tmp / "bed"
    bed.mkdir(mode=0o755)
    chown_to(bed, test_user)
    r = down(bed)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert f"belongs to {test_user}, not to root" in r.stderr and "Traceback" not in r.stderr


# --- the ARC CE's runtime environment ------------------------------------------------------------


def arcctl_rte(arc_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    conf = arc_dir / "arc.conf"
    conf.write_text(arc.render_arc_conf(arc_dir, Path("/tb/etc/slurm.conf"), "nobody"))
    return subprocess.run(["arcctl", "-c", str(conf), "rte", *args], capture_output=True, text=True, check=False)


PARAMS = {"APPPOT_START": "/tb/site/bin/apppot-start", "APPPOT_IMAGE": "/tb/site/images/tiny.img"}


@pytest.mark.skipif(shutil.which("arcctl") is None, reason="needs ARC's arcctl (nordugrid-arc-arcctl)")
def test_the_rte_is_enabled_and_set_as_arcctl_does_also_where_arcctl_fails(safe_tmp: Path) -> None:
    by_arcctl = safe_tmp / "by-arcctl"
    arc.enable_rte(by_arcctl)  # the RTE file in runtimedir (and the seed's names); arcctl links and configures them
    for name in arc.RTE_NAMES:
        (by_arcctl / "var" / "control" / "rte" / "enabled" / name).unlink()
        assert arcctl_rte(by_arcctl, "enable", name).returncode == 0
        for param, value in PARAMS.items():
            assert arcctl_rte(by_arcctl, "params-set", name, param, value).returncode == 0
    ours = safe_tmp / "Grid-APPS"  # arcctl strips the characters of runtimedir, not the prefix
    arc.enable_rte(ours)
    arc.set_rte_params(ours, PARAMS)
    assert arcctl_rte(ours, "enable", arc.RTE_NAME).returncode != 0  # ARC's own bug: why arcctl is not used
    assert arc.RTE_NAMES == ("APPS/APPPOT-0", "TEST/APPPOT-0", "ENV/APPPOT-0.21")
    for name in arc.RTE_NAMES:
        for d in (by_arcctl, ours):
            link = d / "var" / "control" / "rte" / "enabled" / name
            assert link.readlink() == arc.rte_file(d)  # the seed's names too: arcctl follows the alias
        assert arc.rte_params_file(ours, name).read_text() == arc.rte_params_file(by_arcctl, name).read_text()
        assert arc.rte_params_file(ours, name).read_text().startswith('APPPOT_START="/tb/site/bin/apppot-start"\n')
    arc.set_rte_params(ours, {"APPPOT_IMAGE": "/other.img"})  # a later change keeps the others
    assert 'APPPOT_IMAGE="/other.img"\nAPPPOT_KERNEL=""\n' in arc.rte_params_file(ours).read_text()
    with pytest.raises(HostError, match="a shell would interpret"):
        arc.set_rte_params(ours, {"APPPOT_IMAGE": '/x"; rm -rf /; "'})


# --- what `down` and `env` say --------------------------------------------------------------------


def test_down_says_what_it_stops_and_what_it_waits_for(safe_tmp: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """A daemon slow to end on TERM (here: one that ignores it) is waited for, and `down` says so."""
    program = safe_tmp / "slurmctld"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", program)
    program.chmod(0o755)
    proc = subprocess.Popen([str(program), "300"], preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    processes.append(proc)
    bed = bed_with_pid_file(safe_tmp, "slurmctld.pid", proc.pid)
    r = down(bed)
    assert r.returncode == 0 and proc.wait(timeout=5) == -signal.SIGKILL
    assert r.stderr.splitlines() == [
        f"apppot: stopping slurmctld (pid {proc.pid})",
        "apppot: slurmctld has not ended 1 s after TERM; waiting up to 10 s in all, then KILL",
        "apppot: stopped slurmctld",
    ]


def test_down_removes_the_configuration_file_a_rex_ran_with(safe_tmp: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """A-REX's start scripts leave arched's configuration in /tmp (mktemp -t arex.xml.XXXXXX): `down`
    removes the one the stopped arched names on its command line, and nothing else."""
    used, other = safe_tmp / "arex.xml.AbC123", safe_tmp / "arex.xml.XyZ789"
    for f in (used, other):
        f.write_text("<ArcConfig/>\n")
    arched = safe_tmp / "arched"  # a shell under arched's name, with arched's arguments
    shutil.copy(shutil.which("bash") or "/bin/bash", arched)
    proc = subprocess.Popen([str(arched), "-c", "sleep 300; :", "-c", str(used)])
    processes.append(proc)
    bed = statedir.prepare(safe_tmp / "bed")
    (bed / "arc" / "run").mkdir(parents=True)
    (bed / "arc" / "run" / "arex.pid").write_text(f"{proc.pid}\n")
    r = down(bed)
    assert r.returncode == 0 and "stopped arex" in r.stderr, r.stderr
    assert not used.exists() and other.exists()


def test_env_without_a_cluster_says_so(safe_tmp: Path) -> None:
    bed = statedir.prepare(safe_tmp / "bed")
    env = {**os.environ, "APPPOT_TESTBED_DIR": str(bed)}
    r = subprocess.run([APPPOT, "testbed", "env"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 125 and r.stdout == ""
    assert r.stderr.startswith(f"apppot: error: no test cluster is up in {bed}: start one with 'apppot testbed up'")
    assert r.stderr.count("\n") == 1

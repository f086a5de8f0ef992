"""A throw-away Slurm cluster on this machine, for tests and for users who want to try `apppot submit`.

    apppot testbed up [--nodes N]     munged, slurmctld and N slurmd (nodes n1..nN on 127.0.0.1), and a
                                      copy of AppPot every user's jobs can run (site/bin/apppot)
    apppot testbed down               stops what `up` started, by PID
    apppot testbed env                the SLURM_CONF line to export

Everything lives in one directory ($APPPOT_TESTBED_DIR, default /tmp/apppot-testbed); the daemons
listen on loopback only. It needs root: slurmd starts jobs as the users who submit them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError
from apppot.proc import run, which

DAEMONS = ("slurmctld", "slurmd", "munged", "sinfo", "sbatch", "munge")
CONTROLLER_PORT = 16817  # not Slurm's default 6817: a site's own Slurm may run here too
FIRST_NODE_PORT = 17001


class LocalCluster(NamedTuple):
    directory: Path
    nodes: int

    @property
    def conf(self) -> Path:
        return self.directory / "etc" / "slurm.conf"

    @property
    def site_apppot(self) -> Path:
        return self.directory / "site" / "bin" / "apppot"

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]


def testbed_dir() -> Path:
    return Path(os.environ.get("APPPOT_TESTBED_DIR") or "/tmp/apppot-testbed")


def render_slurm_conf(bed: LocalCluster, cpus: int, mem_mib: int) -> str:
    """slurm.conf for N nodes on loopback; no cgroups, no slurmdbd (sacct -c reads the jobcomp file)."""
    d = bed.directory
    last = FIRST_NODE_PORT + bed.nodes - 1
    ports = f"{FIRST_NODE_PORT}" if bed.nodes == 1 else f"[{FIRST_NODE_PORT}-{last}]"
    names = "n1" if bed.nodes == 1 else f"n[1-{bed.nodes}]"
    return f"""\
# AppPot's test cluster ({bed.nodes} node(s) on this machine); written by apppot testbed up
ClusterName=apppot
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={CONTROLLER_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MpiDefault=none
# Bind to the configured loopback addresses, not to every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
ReturnToService=2
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
NodeName={names} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports} CPUs={cpus} RealMemory={mem_mib} State=UNKNOWN
PartitionName=apppot Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def install_site(bed: LocalCluster) -> Path:
    """A copy of this AppPot that every user's batch jobs can run: the package under site/lib, run by
    the system's Python 3 (this process's interpreter may live where other users cannot go, e.g. a
    Python under /root), and the kernel AppPot would use, under site/kernel. Returns the launcher."""
    import shutil
    import sys

    import apppot
    from apppot.kernel import find_kernel

    site = bed.directory / "site"
    if site.exists():
        shutil.rmtree(site)
    package = Path(apppot.__file__).parent
    shutil.copytree(package, site / "lib" / "apppot", ignore=shutil.ignore_patterns("__pycache__"))
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    launcher = bed.site_apppot
    launcher.parent.mkdir(parents=True)
    for name, function in ((launcher.name, "entry"), ("apppot-start", "start_entry")):
        (launcher.parent / name).write_text(
            f"#!{python}\n# AppPot for the test cluster's jobs (apppot testbed up)\nimport sys\n\n"
            f"sys.path.insert(0, {str(site / 'lib')!r})\nfrom apppot.cli import {function}\n\n{function}()\n"
        )
        (launcher.parent / name).chmod(0o755)
    from apppot.images import tiny

    (site / "images").mkdir()
    shutil.copy2(tiny.build().path, site / "images" / "tiny.img")  # the CE's default image
    kernel = find_kernel(None).path
    (site / "kernel").mkdir()
    shutil.copy2(kernel, site / "kernel" / "linux")
    if (kernel.parent / "kernel.json").exists():  # AppPot's own kernel: its record goes along
        shutil.copy2(kernel.parent / "kernel.json", site / "kernel" / "kernel.json")
    for path in [site, *site.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    return launcher


def _check_host() -> None:
    if os.geteuid() != 0:
        raise HostError("the test cluster needs root (slurmd starts jobs as their users): run 'sudo apppot testbed up'")
    missing = [d for d in DAEMONS if which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        raise HostError(f"{', '.join(missing)} not installed: sudo apt-get install slurm-wlm munge")


def listening(port: int) -> bool:
    """Whether something accepts connections on this loopback port."""
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _munge_running() -> bool:
    munge = which("munge") or "/usr/bin/munge"
    return subprocess.run([munge, "-n"], capture_output=True, check=False).returncode == 0


def _start_munge(bed: LocalCluster) -> None:
    if _munge_running():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        run(["mungekey", "-c", "-k", str(key)], package="munge")
        subprocess.run(["chown", "munge:munge", str(key)], check=True)
        key.chmod(0o400)
    Path("/run/munge").mkdir(exist_ok=True)
    subprocess.run(["chown", "munge:munge", "/run/munge"], check=True)
    run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], package="munge")
    (bed.directory / "run" / "munged.ours").write_text("started by apppot testbed up\n")
    for _ in range(50):
        if _munge_running():
            return
        time.sleep(0.1)
    raise HostError("munged did not start; see /var/log/munge/munged.log")


def _idle_nodes(bed: LocalCluster) -> int:
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%D %t"],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_CONF": str(bed.conf)},
        check=False,
    )
    return sum(int(n) for n, state in (line.split() for line in out.stdout.splitlines() if line.strip()) if state == "idle")


def up(nodes: int = 1, timeout: float = 60, arc_user: str | None = None) -> tuple[LocalCluster, float]:
    """Start the cluster (and an ARC CE in front of it for arc_user); returns it and how long it took."""
    _check_host()
    started = time.monotonic()
    bed = LocalCluster(testbed_dir(), nodes)
    if (bed.directory / "run" / "slurmctld.pid").exists() or listening(CONTROLLER_PORT):
        raise HostError(
            f"a test cluster runs already (port {CONTROLLER_PORT} is taken, or {bed.directory} has one): "
            "stop it with 'apppot testbed down' (with the same APPPOT_TESTBED_DIR)"
        )
    for sub in ("etc", "state", "run", "log", *(f"spool/{n}" for n in bed.node_names())):
        (bed.directory / sub).mkdir(parents=True, exist_ok=True)
    bed.directory.chmod(0o755)
    cpus = os.cpu_count() or 1
    mem_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20) * 8 // 10 // nodes
    bed.conf.write_text(render_slurm_conf(bed, cpus, mem_mib))
    jobcomp = bed.directory / "log" / "jobcomp.txt"
    jobcomp.touch()
    jobcomp.chmod(0o666)  # sacct -c opens it for appending, also to read
    (bed.directory / "nodes").write_text(f"{nodes}\n")
    install_site(bed)
    _start_munge(bed)
    run(["slurmctld", "-f", str(bed.conf)], package="slurm-wlm")
    for name in bed.node_names():
        run(["slurmd", "-f", str(bed.conf), "-N", name], package="slurm-wlm")
    while _idle_nodes(bed) < nodes:
        if time.monotonic() - started > timeout:
            raise HostError(f"the test cluster's nodes did not become idle in {timeout:.0f} s; see {bed.directory / 'log'}")
        time.sleep(0.2)
    if arc_user is not None:
        from apppot import testbed_arc

        testbed_arc.up(bed.directory / "arc", bed.conf, bed.directory / "site", arc_user)
    return bed, time.monotonic() - started


def stop_pid_file(pid_file: Path) -> bool:
    """Stop the daemon whose pid the file holds (TERM, then KILL after 10 s); True if one was running."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)  # raises once it is gone
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    with contextlib.suppress(OSError):
        pid_file.unlink()
    return True


def down() -> list[str]:
    """Stop the daemons `up` started (A-REX, slurmd, slurmctld, and munged if it started it); returns what it stopped."""
    from apppot import testbed_arc

    directory = testbed_dir()
    run_dir = directory / "run"
    stopped = testbed_arc.down(directory / "arc")
    pid_files = [*sorted(run_dir.glob("slurmd-*.pid")), run_dir / "slurmctld.pid"]
    if (run_dir / "munged.ours").exists():
        pid_files.append(Path("/run/munge/munged.pid"))
    stopped += [f.stem for f in pid_files if stop_pid_file(f)]
    (run_dir / "munged.ours").unlink(missing_ok=True)
    return stopped

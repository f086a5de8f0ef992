"""The test cluster's Slurm: its configuration (pure), munged, slurmctld and one slurmd per node."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError
from apppot.proc import run, which
from apppot.testbed.daemons import Daemon
from apppot.testbed.statedir import owner_writable_only

PROGRAMS = ("slurmctld", "slurmd", "munged", "sinfo", "sbatch", "munge")
CONTROLLER_PORT = 16817  # not Slurm's default 6817: a site's own Slurm may run here too
FIRST_NODE_PORT = 17001
# How long slurmctld remembers a finished job (scontrol, which apppot status asks first). Users cannot
# fall back on `sacct -c`: Slurm's jobcomp/filetxt opens the file for writing even to read it, and
# it is writable by root alone (anyone who could write it could forge any job's result).
JOB_MEMORY = 86400
MUNGED = Daemon("munged", Path("/run/munge/munged.pid"), "munged", "munge")


class LocalCluster(NamedTuple):
    directory: Path
    nodes: int

    @property
    def conf(self) -> Path:
        return self.directory / "etc" / "slurm.conf"

    @property
    def site_apppot(self) -> Path:
        return self.directory / "site" / "bin" / "apppot"

    @property
    def jobcomp(self) -> Path:
        return self.directory / "log" / "jobcomp.txt"

    @property
    def munged_marker(self) -> Path:
        """There if `up` started munged (so `down` stops it)."""
        return self.directory / "run" / "munged.ours"

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]


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
MinJobAge={JOB_MEMORY}
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={bed.jobcomp}
NodeName={names} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports} CPUs={cpus} RealMemory={mem_mib} State=UNKNOWN
PartitionName=apppot Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def check_host() -> None:
    if os.geteuid() != 0:
        raise HostError("the test cluster needs root (slurmd starts jobs as their users): run 'sudo apppot testbed up'")
    missing = [p for p in PROGRAMS if which(p) is None and not Path("/usr/sbin", p).exists()]
    if missing:
        raise HostError(f"{', '.join(missing)} not installed: sudo apt-get install slurm-wlm munge")


def write_config(bed: LocalCluster) -> None:
    """slurm.conf, the directories it names, and the job completion file: root's, readable by all."""
    with owner_writable_only():
        _write_config(bed)


def _write_config(bed: LocalCluster) -> None:
    for sub in ("etc", "state", "run", "log", *(f"spool/{n}" for n in bed.node_names())):
        (bed.directory / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    mem_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20) * 8 // 10 // bed.nodes
    bed.conf.write_text(render_slurm_conf(bed, cpus, mem_mib))
    # slurmctld would make it with the mode its umask leaves; made here, it is 0644 whatever that is.
    fd = os.open(bed.jobcomp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    (bed.directory / "nodes").write_text(f"{bed.nodes}\n")


def munge_running() -> bool:
    munge = which("munge") or "/usr/bin/munge"
    return run([munge, "-n"], check=False).returncode == 0


def start_munge(bed: LocalCluster) -> bool:
    """Start munged unless one runs; True if this started it."""
    if munge_running():
        return False
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        run(["mungekey", "-c", "-k", str(key)], package="munge")
        run(["chown", "munge:munge", str(key)])
        key.chmod(0o400)
    Path("/run/munge").mkdir(mode=0o755, exist_ok=True)
    run(["chown", "munge:munge", "/run/munge"])
    run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], package="munge")
    bed.munged_marker.write_text("started by apppot testbed up\n")
    for _ in range(50):
        if munge_running():
            return True
        time.sleep(0.1)
    raise HostError("munged did not start; see /var/log/munge/munged.log")


def start_slurm(bed: LocalCluster) -> None:
    run(["slurmctld", "-f", str(bed.conf)], package="slurm-wlm")
    for name in bed.node_names():
        run(["slurmd", "-f", str(bed.conf), "-N", name], package="slurm-wlm")


def idle_nodes(bed: LocalCluster) -> int:
    out = run(["sinfo", "-h", "-o", "%D %t"], env={"SLURM_CONF": str(bed.conf)}, check=False).stdout.decode()
    return sum(int(n) for n, state in (line.split() for line in out.splitlines() if line.strip()) if state == "idle")

"""`apppot testbed up` and `down`: start the whole test cluster, or nothing; stop what it started."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

from apppot.errors import AppPotError, HostError
from apppot.say import Say
from apppot.testbed import arc, daemons, slurm, statedir
from apppot.testbed.daemons import Daemon
from apppot.testbed.site import install_site
from apppot.testbed.slurm import CONTROLLER_PORT, MUNGED, LocalCluster


class Stopped(NamedTuple):
    names: list[str]  # the daemons stopped
    notes: list[str]  # PIDs left alone, and why


def up(nodes: int = 1, timeout: float = 60, arc_user: str | None = None) -> tuple[LocalCluster, float]:
    """Start the cluster (and an ARC CE in front of it for arc_user); returns it and how long it took.
    If it fails on the way, it stops what it had started and says so in the error."""
    slurm.check_host()
    if arc_user is not None:
        arc.check_host(arc_user)
    started = time.monotonic()
    bed = LocalCluster(statedir.prepare(statedir.testbed_dir()), nodes)
    if (bed.directory / "run" / "slurmctld.pid").exists() or daemons.listening(CONTROLLER_PORT):
        raise HostError(
            f"a test cluster runs already (port {CONTROLLER_PORT} is taken, or {bed.directory} has one): "
            f"stop it with 'apppot testbed down' (with the same {statedir.ENV})"
        )
    if arc_user is not None and daemons.listening(arc.PORT):
        raise HostError(f"port {arc.PORT} is taken (another A-REX?); stop it first")
    with statedir.owner_writable_only():
        _start(bed, timeout, started, arc_user)
    return bed, time.monotonic() - started


def _start(bed: LocalCluster, timeout: float, started: float, arc_user: str | None) -> None:
    """Everything or nothing: on a failure, what had started is stopped again."""
    try:
        slurm.write_config(bed)
        install_site(bed.directory / "site")
        slurm.start_munge(bed)
        slurm.start_slurm(bed)
        while slurm.idle_nodes(bed) < bed.nodes:
            if time.monotonic() - started > timeout:
                raise HostError(f"the test cluster's nodes did not become idle in {timeout:.0f} s; see {bed.directory / 'log'}")
            time.sleep(0.2)
        if arc_user is not None:
            arc.up(bed.directory / "arc", bed.conf, bed.directory / "site", arc_user)
    except (AppPotError, OSError) as e:
        stopped = stop(bed.directory)
        what = f"stopped what it had started ({', '.join(stopped.names)})" if stopped.names else "nothing was left running"
        raise HostError(f"{e}; {what}") from e
    except BaseException:  # interrupted: the same, said by the CLI's handler
        stop(bed.directory)
        raise


def stop(directory: Path, say: Say | None = None) -> Stopped:
    """Stop A-REX, the slurmd and slurmctld of the cluster in directory (by pid file, and any still
    naming its slurm.conf), and munged if its `up` started it; say hears each as it goes."""
    result = Stopped([], [])

    def record(name: str, outcome: daemons.Outcome) -> None:
        if outcome.stopped:
            result.names.append(name)
        if outcome.note:
            result.notes.append(outcome.note)

    arc_configurations = arc.temporary_configurations(directory / "arc")
    run_dir = directory / "run"
    slurmds = [Daemon(f.stem, f, "slurmd") for f in sorted(run_dir.glob("slurmd-*.pid"))]
    for daemon in [*arc.daemons(directory / "arc"), *slurmds, Daemon("slurmctld", run_dir / "slurmctld.pid", "slurmctld")]:
        record(daemon.name, daemons.stop(daemon, say=say))
    conf = str(LocalCluster(directory, 0).conf)
    for program in ("slurmd", "slurmctld"):  # started, but without a pid file (yet)
        for pid in daemons.processes_naming(program, 0, conf):
            record(program, daemons.stop_pid(pid, program, 0, say))
    marker = LocalCluster(directory, 0).munged_marker
    if marker.exists():
        record(MUNGED.name, daemons.stop(MUNGED, remove_pid_file=False, say=say))  # munged removes its own
        marker.unlink()
    arc.remove_temporary_configurations(arc_configurations)
    return result


def down(say: Say | None = None) -> Stopped:
    """Stop what `up` started in the testbed directory; nothing if there is none."""
    directory = statedir.existing(statedir.testbed_dir())
    return Stopped([], []) if directory is None else stop(directory, say)


def running_conf() -> Path:
    """The slurm.conf of the test cluster that is up (for `apppot testbed env`)."""
    directory = statedir.existing(statedir.testbed_dir())
    bed = LocalCluster(directory or statedir.testbed_dir(), 0)
    if directory is None or not (directory / "run" / "slurmctld.pid").exists() or not daemons.listening(CONTROLLER_PORT):
        raise HostError(
            f"no test cluster is up in {bed.directory}: start one with 'apppot testbed up' (as root; "
            f"{statedir.ENV} names its directory)"
        )
    return bed.conf

"""Slurm: the batch script for a job (pure), and sbatch, scontrol/sacct and scancel around it."""

from __future__ import annotations

import os
import re
import shlex
import socket
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError, UsageError
from apppot.proc import run, which
from apppot.submit.job import RECORD, STDERR, STDOUT, BatchJob, check_job_name, format_wall_time

SLURM_CONF = "/etc/slurm/slurm.conf"  # where Slurm's tools look without SLURM_CONF
DEFAULT_CONTROLLER_PORT = 6817

# Slurm's states that will not change any more.
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class SlurmStatus(NamedTuple):
    state: str  # Slurm's JobState, e.g. PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT
    exit_code: int | None  # the batch script's exit status: the job's own, through apppot start
    signal: int | None  # the signal that ended it, if any
    source: str  # scontrol, sacct or "sacct -c" (the jobcomp file, where accounting is disabled)


def render_sbatch(job: BatchJob, stage: Path, apppot: str) -> str:
    """The batch script: Slurm runs `apppot start` in the staged job directory; its exit status is the job's.

    stage holds job/ (the job directory: inputs, the changes archive) and receives stdout.txt and
    stderr.txt, outside the job directory so that the job cannot clobber them. No path goes into an
    #SBATCH line: a blank splits it, a newline ends it, and Slurm expands % in --output. sbatch is
    given the job directory on its command line (sbatch_argv), and the output names are relative to
    it (slurmd joins them to the working directory, and Debian's Slurm 24 expands % in the whole:
    check_stage_path refuses such directories). The command line is quoted for sh; the text may
    carry bytes that are not UTF-8 (as surrogates: os.fsencode)."""
    if job.image is None:
        raise UsageError("a Slurm job needs an image the nodes can read: give --image")
    # The record goes next to stdout and stderr, outside the job directory the guest can write.
    start = [apppot, "start", "--record", str(stage / RECORD), "--image", str(job.image), "--mem", f"{job.mem_bytes >> 20}M"]
    if job.verify:  # the name became a path here; the worker still checks the bytes against the image's record
        start += ["--verify"]
    if job.changes is not None:
        start += ["--changes", str(stage / "job" / job.changes.name)]
    start += ["--", *job.argv]
    lines = [
        "#!/bin/sh",
        f"#SBATCH --job-name={check_job_name(job.name)}",
        f"#SBATCH --mem={job.batch_mem_mib()}M",
        f"#SBATCH --time={format_wall_time(job.wall_seconds)}",
        f"#SBATCH --cpus-per-task={job.cores}",
        "#SBATCH --nodes=1",
        f"#SBATCH --output=../{STDOUT}",
        f"#SBATCH --error=../{STDERR}",
        "# sbatch --chdir is the staged job directory; stdout and stderr go next to it.",
        "# The guest needs memory of its own besides the job's: see apppot.submit.job.UML_OVERHEAD.",
        f"exec {shlex.join(start)}",
    ]
    return "\n".join(lines) + "\n"


def check_stage_path(jobs: Path) -> Path:
    """The directory jobs are staged in, if Slurm can take it as a working directory: slurmd expands
    % (and, in some versions, \\) in the whole path of the output files, the working directory
    included, and a control character has no business in a path Slurm logs and stores."""
    text = str(jobs)
    bad = next((c for c in text if c in "%\\" or not c.isprintable()), None)
    if bad is not None:
        raise UsageError(
            f"the staging directory {text!r} has {bad!r}, which Slurm would expand or mangle in its output paths: "
            "set XDG_CACHE_HOME to a path without it"
        )
    return jobs


def sbatch_argv(sbatch: str, script: Path, jobdir: Path) -> list[str]:
    """sbatch's command line: the job directory as an argument of its own, never parsed from the script."""
    return [sbatch, "--parsable", "--chdir", str(jobdir), str(script)]


def _require(program: str) -> str:
    found = which(program)
    if found is None:
        raise HostError(
            f"{program} is not installed: install Slurm's client tools (sudo apt-get install slurm-client), "
            "or start a local test cluster with 'apppot testbed up'"
        )
    return found


def submit(script: Path, jobdir: Path) -> str:
    """sbatch the script to run in jobdir; returns Slurm's job id. A controller that refuses connections
    is said at once (sbatch would retry for Slurm's MessageTimeout first)."""
    down = controller_refuses(conf_path())
    if down:
        raise controller_down_error(down)
    out = run(sbatch_argv(_require("sbatch"), script, jobdir), cwd=jobdir, check=False, slow="Slurm's controller (sbatch)")
    if out.returncode != 0:
        raise HostError(f"sbatch refused the job: {_last_line(out.stderr)}")
    return out.stdout.decode().strip().split(";")[0]


def cancel(job_id: str) -> None:
    out = run([_require("scancel"), job_id], check=False, slow="Slurm's controller (scancel)")
    if out.returncode != 0:
        raise HostError(f"scancel {job_id} failed: {_last_line(out.stderr)}")


def parse_scontrol(text: str) -> tuple[str, int | None, int | None] | None:
    """(JobState, exit code, signal) from `scontrol show job -o` output."""
    state = re.search(r"\bJobState=(\S+)", text)
    code = re.search(r"\bExitCode=(\d+):(\d+)", text)
    if not state:
        return None
    exit_code, signal = (int(code.group(1)), int(code.group(2))) if code else (None, None)
    return state.group(1), exit_code, signal


def parse_sacct(text: str, job_id: str) -> tuple[str, int | None, int | None] | None:
    """(State, exit code, signal) from `sacct -P -n -o jobid,state,exitcode` lines for the job."""
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) >= 3 and fields[0] == job_id:
            state = fields[1].split()[0] if fields[1] else "UNKNOWN"  # "CANCELLED by 0"
            code = re.fullmatch(r"(\d+):(\d+)", fields[2])
            return state, (int(code.group(1)) if code else None), (int(code.group(2)) if code else None)
    return None


def controllers(conf_text: str) -> list[tuple[str, int]]:
    """The (address, port) of each SlurmctldHost (or ControlMachine) in a slurm.conf; [] if unsure."""
    hosts: list[str] = []
    port = DEFAULT_CONTROLLER_PORT
    for raw in conf_text.splitlines():
        key, _, value = raw.split("#", 1)[0].strip().partition("=")
        key, value = key.strip().lower(), value.strip()
        if key.split()[0:1] == ["include"]:  # settings elsewhere: AppPot cannot tell
            return []
        if key in ("slurmctldhost", "controlmachine", "controladdr") and value:
            name, _, address = value.partition("(")
            hosts.append(address.rstrip(")") or name)
        elif key == "slurmctldport":
            first = value.split("-")[0]
            if not first.isdigit():
                return []
            port = int(first)
    return [(h, port) for h in hosts]


def controller_refuses(conf: Path) -> str | None:
    """'host:port' when every controller slurm.conf names refuses connections right away (the cluster is
    down; scontrol would retry for MessageTimeout first); None when one answers or AppPot cannot tell."""
    try:
        if not conf.is_file() or conf.stat().st_size > 1 << 20:  # a FIFO would block; no slurm.conf is that large
            return None
        found = controllers(conf.read_text(errors="replace"))
    except OSError:
        return None
    for host, port in found:
        try:
            with socket.create_connection((host, port), timeout=1):
                return None
        except ConnectionRefusedError:
            continue
        except OSError:
            return None  # a timeout, an unknown name: scontrol knows better
    return ", ".join(f"{h}:{p}" for h, p in found) or None


def conf_path() -> Path:
    """slurm.conf: $SLURM_CONF, else Slurm's default; a $SLURM_CONF that is no file is refused at once
    (sbatch and scontrol would retry it for a minute)."""
    given = os.environ.get("SLURM_CONF")
    if given and not Path(given).is_file():
        raise HostError(f"SLURM_CONF names {given}, which is not a file: point it at the cluster's slurm.conf")
    return Path(given or SLURM_CONF)


def controller_down_error(down: str) -> HostError:
    return HostError(f"Slurm's controller ({down}) refuses connections: start the cluster, or check SLURM_CONF")


def status(job_id: str) -> SlurmStatus:
    """The job's state: scontrol while Slurm remembers it, else sacct (or the jobcomp file without slurmdbd)."""
    down = controller_refuses(conf_path())
    scontrol = [_require("scontrol"), "show", "job", "-o", job_id]
    out = None if down else run(scontrol, check=False, slow="Slurm's controller (scontrol)")
    if out is not None and out.returncode == 0:
        parsed = parse_scontrol(out.stdout.decode())
        if parsed:
            return SlurmStatus(*parsed, "scontrol")
    fields = ["-X", "-P", "-n", "-o", "jobid,state,exitcode", "-j", job_id]
    for extra, source in (([], "sacct"), (["-c"], "sacct -c")):
        sacct = which("sacct")
        if sacct is None:
            break
        out = run([sacct, *extra, *fields], check=False, slow=f"Slurm's accounting ({source})")
        if out.returncode == 0:
            parsed = parse_sacct(out.stdout.decode(), job_id)
            if parsed:
                return SlurmStatus(*parsed, source)
    if down:
        raise controller_down_error(down)
    if out is not None and b"Unable to contact slurm controller" in out.stderr:
        raise HostError(f"Slurm's controller does not answer ({_last_line(out.stderr)}): start the cluster, or check SLURM_CONF")
    raise HostError(f"Slurm does not know job {job_id} any more (neither scontrol nor sacct has it)")


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no message"

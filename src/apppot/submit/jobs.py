"""Submitted jobs on this machine: staging, records, status, fetching outputs.

Each submission gets a staging directory in $XDG_CACHE_HOME/apppot/jobs: job/ is the job
directory the batch system runs `apppot start` in (the inputs and the changes archive are copied
there), stdout.txt and stderr.txt land next to it, and record.json says which batch job it is.
The user-facing job id is TARGET-ID, e.g. slurm-42.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

from apppot.errors import EXIT_APPPOT_ERROR, EXIT_GUEST_DIED, UsageError
from apppot.images.store import cache_dir
from apppot.submit import arc, slurm
from apppot.submit.job import BatchJob

TARGETS = ("slurm", "arc")


class JobRecord(NamedTuple):
    job_id: str  # TARGET-NATIVEID
    target: str
    native_id: str
    name: str
    stage: str
    outputs: list[str]
    submitted: str

    def write(self) -> None:
        path = Path(self.stage) / "record.json"
        path.write_text(json.dumps(self._asdict(), indent=2) + "\n")


class JobStatus(NamedTuple):
    job_id: str
    state: str
    exit_code: int | None
    final: bool
    explanation: str


def jobs_dir() -> Path:
    return cache_dir() / "jobs"


def apppot_command() -> str:
    """The apppot program the batch job runs: this one."""
    here = Path(sys.argv[0]).resolve() if sys.argv and Path(sys.argv[0]).name == "apppot" else None
    return str(here or Path(sys.executable).parent / "apppot")


def stage(job: BatchJob, changes_name: str | None = None) -> Path:
    """A new staging directory with the job directory in it: inputs and the changes archive copied
    (under changes_name, if given)."""
    sources = [*job.inputs, *([job.changes] if job.changes else [])]
    names = set()
    for source in sources:
        if source.name in names:
            raise UsageError(f"two inputs are named {source.name}; the job directory holds them side by side, so rename one")
        names.add(source.name)
        if not source.is_file():
            raise UsageError(f"input {source} is not a file; give files with --input (and --changes)")
    where = jobs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    jobdir = where / "job"
    jobdir.mkdir(parents=True)
    for source in job.inputs:
        shutil.copy2(source, jobdir / source.name)
    if job.changes is not None:
        shutil.copy2(job.changes, jobdir / (changes_name or job.changes.name))
    return where


def submit(job: BatchJob, target: str, dry_run: bool, ce: str | None = None) -> tuple[JobRecord | None, str]:
    """Stage and submit the job; returns its record (None on a dry run) and the description submitted."""
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
    if target == "arc":
        return _submit_arc(job, dry_run, ce)
    if dry_run:
        return None, slurm.render_sbatch(job, jobs_dir() / "STAGE", apppot_command())
    where = stage(job)
    script_text = slurm.render_sbatch(job, where, apppot_command())
    script = where / "job.sh"
    script.write_text(script_text)
    try:
        native = slurm.submit(script)
    except Exception:
        shutil.rmtree(where, ignore_errors=True)
        raise
    record = JobRecord(
        f"{target}-{native}",
        target,
        native,
        job.name,
        str(where),
        list(job.outputs),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    record.write()
    return record, script_text


def _submit_arc(job: BatchJob, dry_run: bool, ce: str | None) -> tuple[JobRecord | None, str]:
    xrsl = arc.render_xrsl(job)
    if dry_run:
        return None, xrsl
    if not ce:
        raise UsageError("give the compute element with --ce URL, e.g. --ce https://ce.example.org:443/arex")
    where = stage(job, changes_name=arc.CHANGES)
    wrapper = where / "job" / arc.WRAPPER
    wrapper.write_text(arc.render_wrapper(job))
    wrapper.chmod(0o755)
    (where / "job.xrsl").write_text(xrsl)
    try:
        url = arc.submit(where / "job.xrsl", where / "job", ce)
    except Exception:
        shutil.rmtree(where, ignore_errors=True)
        raise
    submitted = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    short = url.rstrip("/").rsplit("/", 1)[-1][:12]
    record = JobRecord(f"arc-{short}", "arc", url, job.name, str(where), list(job.outputs), submitted)
    record.write()
    return record, xrsl


def _arc_state(state: str, exit_code: int | None) -> str:
    """ARC's job states in the words `apppot status` uses for every target."""
    if state == "Finished":
        return "COMPLETED" if not exit_code else "FAILED"
    return {"Failed": "FAILED", "Killed": "CANCELLED", "Deleted": "DELETED", "Running": "RUNNING", "Finishing": "RUNNING"}.get(
        state, "PENDING"
    )


def find(job_id: str) -> JobRecord:
    for path in sorted(jobs_dir().glob("*/record.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("job_id") == job_id:
            return JobRecord(**{k: data[k] for k in JobRecord._fields})
    raise UsageError(f"no job {job_id} was submitted from this account (see {jobs_dir()})")


def explain(state: str, exit_code: int | None) -> str:
    if state == "TIMEOUT":
        return "killed at its wall-time limit (--time)"
    if state == "NODE_FAIL":
        return "the node running it was lost"
    if state == "OUT_OF_MEMORY":
        return "killed for using more memory than asked for (--mem)"
    if state == "CANCELLED":
        return "cancelled"
    if exit_code == EXIT_GUEST_DIED:
        return "the guest died before reporting the job's status (see stderr.txt: apppot fetch)"
    if exit_code == EXIT_APPPOT_ERROR:
        return "AppPot could not run the job (see stderr.txt: apppot fetch)"
    if exit_code is not None and exit_code > 0:
        return f"the job exited with status {exit_code}"
    if state == "COMPLETED":
        return "the job exited with status 0"
    return ""


def status(job_id: str) -> JobStatus:
    record = find(job_id)
    if record.target == "arc":
        state, code = arc.status(record.native_id)
        ours = _arc_state(state, code)
        return JobStatus(job_id, ours, code, state in arc.FINAL, explain(ours, code))
    s = slurm.status(record.native_id)
    return JobStatus(job_id, s.state, s.exit_code, s.state in slurm.FINAL, explain(s.state, s.exit_code))


def cancel(job_id: str) -> None:
    record = find(job_id)
    if record.target == "arc":
        arc.cancel(record.native_id)
    else:
        slurm.cancel(record.native_id)


def clean(job_id: str) -> None:
    """Forget a finished job: its files on the CE (ARC) and its staging directory here."""
    record = find(job_id)
    if not status(job_id).final:
        raise UsageError(f"{job_id} has not finished; cancel it first (apppot cancel {job_id})")
    if record.target == "arc":
        arc.clean(record.native_id)
    shutil.rmtree(record.stage, ignore_errors=True)


def fetch(job_id: str, into: Path, force: bool) -> tuple[Path, list[str], list[str]]:
    """Copy stdout, stderr and the declared outputs into INTO/JOBID; returns it, what was copied and what is missing."""
    record = find(job_id)
    target = into / job_id
    if target.exists() and not force:
        raise UsageError(f"{target} exists; move it away or pass --force to overwrite what is in it")
    target.mkdir(parents=True, exist_ok=True)
    where = Path(record.stage)
    outputs = where / "job"
    if record.target == "arc":  # stdout, stderr and the outputs come back from the CE's session directory
        where = outputs = arc.download(record.native_id, where / "downloaded")
    copied, missing = [], []
    for name, source in [(n, where / n) for n in (slurm.STDOUT, slurm.STDERR)] + [(o, outputs / o) for o in record.outputs]:
        if source.is_file():
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
            copied.append(name)
        else:
            missing.append(name)
    os.utime(target)
    return target, copied, missing

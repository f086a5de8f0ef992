"""Submitted jobs on this machine: staging, records, status, fetching outputs.

Each submission gets a staging directory in $XDG_CACHE_HOME/apppot/jobs: job/ is the job
directory the batch system runs `apppot start` in (the inputs and the changes archive are copied
there), stdout.txt and stderr.txt land next to it, and record.json says which batch job it is.
The user-facing job id is TARGET-ID, e.g. slurm-42.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from apppot.errors import EXIT_APPPOT_ERROR, EXIT_GUEST_DIED, UsageError
from apppot.images.store import cache_dir
from apppot.say import Say, say_stderr
from apppot.submit import arc, results, slurm, worker
from apppot.submit.command_file import CommandFile
from apppot.submit.job import RECORD, STDERR, STDOUT, BatchJob, check_output_name

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


def check_sources(job: BatchJob) -> None:
    """What staging needs of the submit host's files, checked before anything is staged (and on a
    dry run): every input a file, no two with the same name in the job directory."""
    names: set[str] = set()
    for source in [*job.inputs, *([job.changes] if job.changes else [])]:
        if source.name in names:
            raise UsageError(f"two inputs are named {source.name}; the job directory holds them side by side, so rename one")
        names.add(source.name)
        if not source.is_file():
            raise UsageError(f"input {source} is not a file; give files with --input (and --changes)")


def stage(job: BatchJob, changes_name: str | None = None) -> Path:
    """A new staging directory with the job directory in it: inputs, the command's script and the
    changes archive (under changes_name, if given) copied. Nothing is left behind if it cannot be
    made in full."""
    check_sources(job)
    where = jobs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    jobdir = where / "job"
    jobdir.mkdir(parents=True)
    try:
        for source in job.inputs:
            shutil.copy2(source, jobdir / source.name)
        if job.command_file is not None:
            _copy_command_file(job.command_file, jobdir)
        if job.changes is not None:
            shutil.copy2(job.changes, jobdir / (changes_name or job.changes.name))
    except BaseException:
        remove_stage(where)
        raise
    return where


def _copy_command_file(found: CommandFile, jobdir: Path) -> None:
    """The command's script, opened again without following links (it was checked at submit, and the
    submit directory may have changed since), copied with its mode (no set-id bits)."""
    root = os.open(found.source.parents[len(PurePosixPath(found.name).parts) - 1], results.DIR_FLAGS)
    try:
        fd, st = results.open_regular_file(root, found.name)
    except (results.Missing, results.Refusal) as e:
        raise UsageError(f"the command's file {found.source} changed while it was staged ({e or 'gone'}); submit again") from None
    finally:
        os.close(root)
    target = jobdir / found.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(fd, "rb") as source, open(target, "xb") as copy:
        shutil.copyfileobj(source, copy)
    target.chmod(stat.S_IMODE(st.st_mode) & 0o777)


def remove_stage(where: Path) -> None:
    """Remove a staging directory, also what the job left there unreadable (rmtree never follows
    links, and the directories it opens up are changed without following links either)."""

    def unlock(function: object, path: str, error: object) -> None:
        with contextlib.suppress(OSError, NotImplementedError):
            for directory in (os.path.dirname(path), path):
                os.chmod(directory, 0o700, follow_symlinks=False)
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path, onerror=unlock)
            else:
                os.unlink(path)

    shutil.rmtree(where, onerror=unlock)


def submit(
    job: BatchJob, target: str, dry_run: bool, ce: str | None = None, say: Say = say_stderr
) -> tuple[JobRecord | None, str]:
    """Check, stage and submit the job; returns its record (None on a dry run, which checks the same)
    and the description submitted. A submission that fails leaves no staging directory behind."""
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
    check_sources(job)
    if worker.ce_is_this_host(ce) if target == "arc" else worker.slurm_workers_are_this_host():
        worker.check_mem(job.mem_bytes, say)
    if target == "arc":
        return _submit_arc(job, dry_run, ce)
    slurm.check_stage_path(jobs_dir())
    text = slurm.render_sbatch(job, jobs_dir() / "STAGE", apppot_command())  # refuses bad names before staging
    if dry_run:
        return None, text
    where = stage(job)
    try:
        script_text = slurm.render_sbatch(job, where, apppot_command())
        script = where / "job.sh"
        script.write_bytes(os.fsencode(script_text))  # the command's bytes exactly, UTF-8 or not
        native = slurm.submit(script, where / "job")
    except BaseException:
        remove_stage(where)
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
    try:
        wrapper = where / "job" / arc.WRAPPER
        wrapper.write_bytes(os.fsencode(arc.render_wrapper(job)))
        wrapper.chmod(0o755)
        (where / "job.xrsl").write_bytes(xrsl.encode())
        url = arc.submit(where / "job.xrsl", where / "job", ce)
    except BaseException:
        remove_stage(where)
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


def status(job_id: str, say: Say | None = None) -> JobStatus:
    """The job's state; say hears what a slow batch system keeps it waiting for."""
    record = find(job_id)
    if record.target == "arc":
        state, code = arc.status(record.native_id)
        ours = _arc_state(state, code)
        return JobStatus(job_id, ours, code, state in arc.FINAL, explain(ours, code))
    s = slurm.status(record.native_id)
    explanation = explain(s.state, s.exit_code)
    if s.exit_code in (EXIT_APPPOT_ERROR, EXIT_GUEST_DIED) and s.state in slurm.FINAL:
        said = worker.reported_error(Path(record.stage), STDERR)  # e.g. the worker's vm.max_map_count, with the fix
        if said is not None:
            explanation = f"{explanation.split(' (see')[0]} on the worker: {said}"
    return JobStatus(job_id, s.state, s.exit_code, s.state in slurm.FINAL, explanation)


def cancel(job_id: str) -> None:
    record = find(job_id)
    if record.target == "arc":
        arc.cancel(record.native_id)
    else:
        slurm.cancel(record.native_id)


class Cleaned(NamedTuple):
    job_id: str
    stage: str  # the staging directory removed
    bytes: int  # the disk space it used
    on_ce: bool  # the job's files on the CE were removed too (ARC)


def clean(job_id: str) -> Cleaned:
    """Forget a finished job: its files on the CE (ARC) and its staging directory here."""
    record = find(job_id)
    if not status(job_id).final:
        raise UsageError(f"{job_id} has not finished; cancel it first (apppot cancel {job_id})")
    if record.target == "arc":
        arc.clean(record.native_id)
    used = disk_usage(Path(record.stage))
    remove_stage(Path(record.stage))
    return Cleaned(job_id, record.stage, used, record.target == "arc")


def disk_usage(where: Path) -> int:
    """The disk space a staging directory uses, as du counts it: each file once however many hard links
    it has, links never followed. Directories the job left unreadable are opened up (owner rwx, not
    through links) as remove_stage does: clean measures what it removes next."""
    seen: set[tuple[int, int]] = set()
    total = 0
    pending = [str(where)]
    while pending:
        path = pending.pop()
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
        if not stat.S_ISDIR(st.st_mode):
            continue
        if st.st_mode & 0o700 != 0o700:
            with contextlib.suppress(OSError, NotImplementedError):
                os.chmod(path, 0o700 | stat.S_IMODE(st.st_mode), follow_symlinks=False)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            pending += (os.path.join(path, name) for name in os.listdir(fd))
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def _open_fetch_target(into: Path, job_id: str, force: bool) -> int:
    """INTO/JOBID, made new, or (with force) the existing directory, never through a link."""
    if "/" in job_id or job_id in ("", ".", ".."):
        raise UsageError(f"job id {job_id!r} cannot name a directory; clean the job (apppot clean)")
    with contextlib.ExitStack() as stack:
        parent = os.open(into, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, parent)
        try:
            os.mkdir(job_id, 0o777, dir_fd=parent)
        except FileExistsError:
            if not force:
                raise UsageError(f"{into / job_id} exists; move it away or pass --force to overwrite what is in it") from None
        try:
            return os.open(job_id, results.DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UsageError(f"{into / job_id} is not a directory of its own (a link?); move it away") from None
            raise


def fetch(job_id: str, into: Path, force: bool, limit: int = results.DEFAULT_LIMIT) -> tuple[Path, results.CopyReport]:
    """Copy stdout, stderr, the job's record and the declared outputs into INTO/JOBID (only regular files, never
    through a link the job left); returns it and what was copied, missing and refused."""
    record = find(job_id)
    outputs = [check_output_name(o) for o in record.outputs]
    with contextlib.ExitStack() as stack:
        target = _open_fetch_target(into, job_id, force)
        stack.callback(os.close, target)
        stage_dir = Path(record.stage)
        if record.target == "arc":  # stdout, stderr and the outputs come back from the CE's session directory
            stage_dir = arc.download(record.native_id, stage_dir / "downloaded")
        stage_fd = os.open(stage_dir, results.DIR_FLAGS)
        stack.callback(os.close, stage_fd)
        report = results.copy_results(stage_fd, [STDOUT, STDERR, RECORD], target, limit=limit, replace=force)
        if record.target == "arc":
            job_fd = os.dup(stage_fd)
        else:
            try:
                job_fd = results.open_directory(stage_fd, "job")
            except (results.Refusal, results.Missing) as e:
                why = str(e) or "gone"
                raise UsageError(
                    f"the staged job directory {stage_dir / 'job'} is unusable ({why}); clean the job: apppot clean {job_id}"
                ) from None
        stack.callback(os.close, job_fd)
        more = results.copy_results(job_fd, outputs, target, limit=limit, replace=force)
        os.utime(target)
    return into / job_id, results.CopyReport(
        report.copied + more.copied, report.missing + more.missing, report.refused + more.refused
    )

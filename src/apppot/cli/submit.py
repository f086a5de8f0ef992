"""`apppot submit`, `status`, `fetch`, `cancel`, `clean` and `testbed`: jobs on Slurm and ARC."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from apppot.cli.common import human, parser_class
from apppot.cli.start import split_command
from apppot.errors import EXIT_APPPOT_ERROR, UsageError
from apppot.say import say_stderr as say
from apppot.spec import parse_mem

if TYPE_CHECKING:
    from apppot.submit.command_file import CommandFile


def cmd_submit(argv: Sequence[str]) -> int:
    before, after = split_command(argv)
    p = parser_class()(
        prog="apppot submit",
        description="Hand an AppPot job to a batch system; the job always writes its provenance record (apppot fetch brings it).",
    )
    p.add_argument("--to", dest="target", choices=["slurm", "arc"], required=True, help="the batch system or Grid middleware")
    p.add_argument("--ce", metavar="URL", help="ARC: the compute element, e.g. https://ce.example.org:443/arex")
    p.add_argument("--image", help="image file or cache name (default: the tiny appliance); the worker must see it")
    p.add_argument("--changes", type=Path, metavar="TAR", help="an apppot-snap changes archive to merge before the job")
    p.add_argument("--mem", default="256M", help="the guest's memory (default 256M); the batch job asks for 64 MiB more")
    p.add_argument("--time", default="1:00:00", help="wall-time limit, e.g. 30 (minutes) or 2:00:00 (default 1:00:00)")
    p.add_argument("--cores", type=int, default=1, help="cores to reserve (default 1)")
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="copy into the job directory (repeatable)",
    )
    p.add_argument(
        "--output", dest="outputs", action="append", default=[], metavar="NAME", help="fetch from the job directory (repeatable)"
    )
    p.add_argument("--name", default="apppot", help="the batch job's name")
    p.add_argument("--dry-run", action="store_true", help="print the batch script instead of submitting it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(before)
    if not after:
        raise UsageError("give the command to run after --, e.g. apppot submit --to slurm -- ./run.sh")
    from apppot.images.selection import ImageSource, choose_image
    from apppot.prepare import default_image
    from apppot.submit import command_file, jobs
    from apppot.submit.job import BatchJob, check_job_name, check_output_name, parse_wall_time

    image: Path | None = None  # ARC without --image: the site's image (its APPPOT runtime environment names it)
    verify = False
    if ns.image or ns.target != "arc":
        chosen = choose_image(ns.image) if ns.image else None
        image = chosen.path if chosen else default_image(say)
        verify = chosen is not None and chosen.source in (ImageSource.NAME, ImageSource.CONTENT_ID)
        if not image.is_file():
            raise UsageError(f"image {image} does not exist; give an image file or a name from 'apppot image list'")
    if ns.cores < 1:
        raise UsageError("--cores must be at least 1")
    inputs = tuple(i.resolve() for i in ns.inputs)
    # An --input of that name is the job directory's file (and may be a link the input staging follows).
    script = command_file.find(after, Path.cwd(), frozenset(i.name for i in (*ns.inputs, *inputs)))
    job = BatchJob(
        argv=tuple(after),
        image=image.resolve() if image else None,
        mem_bytes=parse_mem(ns.mem),
        wall_seconds=parse_wall_time(ns.time),
        cores=ns.cores,
        changes=ns.changes.resolve() if ns.changes else None,
        inputs=inputs,
        outputs=tuple(check_output_name(o) for o in ns.outputs),
        name=check_job_name(ns.name),
        command_file=script,
        executables=executable_names(inputs, script),
        verify=verify,
    )
    if job.changes is not None:
        from apppot import snap

        try:
            snap.check_archive(str(job.changes))
        except snap.SnapError as e:
            raise UsageError(str(e)) from None
    record, description = jobs.submit(job, ns.target, ns.dry_run, ce=ns.ce)
    if record is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(os.fsencode(description))  # the command's bytes as they are, UTF-8 or not
    elif ns.json:
        import json

        print(json.dumps(record._asdict()))
    else:
        print(record.job_id)
    return 0


def executable_names(inputs: Sequence[Path], script: CommandFile | None) -> tuple[str, ...]:
    """The staged names that have an execute bit now: ARC's client uploads files without their modes."""
    names = [i.name for i in inputs if i.is_file() and os.access(i, os.X_OK)]
    return tuple(names + ([script.name] if script is not None and script.executable else []))


def cmd_status(argv: Sequence[str]) -> int:
    p = parser_class()(prog="apppot status", description="The state of a submitted job.")
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    from apppot.submit import jobs

    s = jobs.status(ns.job_id, say)
    if ns.json:
        import json

        print(json.dumps(s._asdict()))
    else:
        code = f", exit code {s.exit_code}" if s.final and s.exit_code is not None else ""
        print(f"{s.job_id}: {s.state}{code}" + (f" ({s.explanation})" if s.explanation else ""))
    return 0


def cmd_fetch(argv: Sequence[str]) -> int:
    p = parser_class()(
        prog="apppot fetch", description="Copy a job's stdout, stderr, record (apppot-record.json) and outputs into ./JOBID/."
    )
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("--force", action="store_true", help="write into ./JOBID/ even if it exists, replacing files there")
    p.add_argument("--max-size", default="16G", metavar="SIZE", help="refuse a file larger than SIZE (default 16G)")
    ns = p.parse_args(argv)
    from apppot.submit import jobs, results

    limit = results.parse_size(ns.max_size)
    target, report = jobs.fetch(ns.job_id, Path.cwd(), ns.force, limit)
    print(f"{target}: {', '.join(report.copied) or 'nothing'}")
    if report.missing:
        say(f"not there (yet): {', '.join(report.missing)}")
    for refused in report.refused:  # what the job left there is not the user's: never followed, never opened
        sys.stderr.write(
            f"apppot: error: refused {refused.name!r} from the job: {refused.reason}; copy it by hand if you trust it\n"
        )
    return EXIT_APPPOT_ERROR if report.refused else 0


def cmd_clean(argv: Sequence[str]) -> int:
    return _on_job(argv, "clean", "Forget a finished job: its files on the CE and here.")


def cmd_cancel(argv: Sequence[str]) -> int:
    return _on_job(argv, "cancel", "Cancel a submitted job.")


def _on_job(argv: Sequence[str], action: str, description: str) -> int:
    """`apppot clean|cancel JOBID`: apppot.submit.jobs.clean or .cancel; says what was done."""
    p = parser_class()(prog=f"apppot {action}", description=description)
    p.add_argument("job_id", metavar="JOBID")
    ns = p.parse_args(argv)
    from apppot.submit import jobs

    if action == "cancel":
        jobs.cancel(ns.job_id)
        print(f"asked to cancel {ns.job_id} (apppot status {ns.job_id} shows when it has ended)")
        return 0
    cleaned = jobs.clean(ns.job_id)
    on_ce = " and its files on the CE" if cleaned.on_ce else ""
    print(f"cleaned {cleaned.job_id}: removed its staging directory {cleaned.stage} ({human(cleaned.bytes)}){on_ce}")
    return 0


def cmd_testbed(argv: Sequence[str]) -> int:
    p = parser_class()(prog="apppot testbed", description="A throw-away Slurm cluster on this machine (root).")
    sub = p.add_subparsers(dest="action", required=True)
    start = sub.add_parser("up", help="start munged, slurmctld and the nodes' slurmd")
    start.add_argument("--nodes", type=int, default=1, help="simulated nodes on this machine (default 1)")
    start.add_argument("--arc", metavar="USER", help="also an ARC CE in front of it, with USER as the grid user")
    start.add_argument(
        "--timeout", type=float, default=60, metavar="SECONDS", help="how long the nodes may take to be idle (default 60)"
    )
    sub.add_parser("down", help="stop what 'up' started")
    sub.add_parser("env", help="the SLURM_CONF setting for the cluster's clients")
    ns = p.parse_args(argv)
    from apppot import testbed

    if ns.action == "up":
        if ns.nodes < 1:
            raise UsageError("--nodes must be at least 1")
        if ns.timeout <= 0:
            raise UsageError("--timeout must be more than 0 seconds")
        bed, took = testbed.up(ns.nodes, timeout=ns.timeout, arc_user=ns.arc)
        say(f"test cluster up in {took:.1f} s: {bed.nodes} node(s), logs in {bed.directory / 'log'}")
        say(f"AppPot for every user's jobs: {bed.site_apppot} (kernel: {bed.site_apppot.parent.parent / 'kernel' / 'linux'})")
        if ns.arc:
            say(f"ARC CE: https://localhost:8443/arex, grid user {ns.arc} (proxy made)")
        print(f"export SLURM_CONF={bed.conf}")
    elif ns.action == "down":
        stopped = testbed.down(say)
        for note in stopped.notes:
            say(note)
        nothing = "nothing" if stopped.notes else "nothing (no test cluster was running)"
        say(f"stopped {', '.join(stopped.names) if stopped.names else nothing}")
    else:
        print(f"export SLURM_CONF={testbed.running_conf()}")
    return 0

"""NorduGrid ARC: the xRSL description of a job and the wrapper it runs (pure).

The job runs through the site's APPPOT runtime environment (src/apppot/data/rte/APPPOT-0, which a
site enables with `arcctl rte enable APPS/APPPOT-0`): it tells the job where the site keeps
apppot-start, its default image and kernel. The executable is a small wrapper, staged with the
job, that calls apppot-start in the job's session directory, so the job's exit status is ARC's.
"""

from __future__ import annotations

import shlex

from apppot.submit.job import BatchJob

RTE = "APPS/APPPOT-0"
WRAPPER = "apppot-job.sh"
CHANGES = "apppot-changes.tar.gz"
IMAGE = "apppot.img"
STDOUT = "stdout.txt"
STDERR = "stderr.txt"


def quote(value: str) -> str:
    """An xRSL string: in double quotes, a double quote doubled."""
    return '"' + value.replace('"', '""') + '"'


def render_wrapper(job: BatchJob, stage_image: bool) -> str:
    """The job's executable on the worker: apppot-start with the site's settings (from the RTE)."""
    image = IMAGE if stage_image else "${APPPOT_IMAGE:?the site's APPPOT runtime environment sets no image}"
    start = ['"${APPPOT_START:?the site has no APPPOT runtime environment}"', "--image", f'"{image}"']
    start += ["--mem", f"{job.mem_bytes >> 20}M"]
    if job.changes is not None:
        start += ["--changes", CHANGES]
    return (
        "#!/bin/sh\n"
        "# An AppPot job on an ARC CE (rendered by apppot submit --to arc). The APPPOT runtime\n"
        "# environment says where apppot-start and the site's image are.\n"
        f"exec {' '.join(start)} -- {shlex.join(job.argv)}\n"
    )


def render_xrsl(job: BatchJob, stage_image: bool) -> str:
    """The xRSL description: the wrapper, the runtime environment, resources and the files to move.

    Inputs are uploaded by the client from the submission directory (empty URLs); the image is
    staged from its path when stage_image, else the site's is used. Memory is per core in xRSL."""
    memory_mib = -(-job.batch_mem_mib() // job.cores)
    inputs = [WRAPPER, *(p.name for p in job.inputs)]
    staged = [f"({quote(name)} {quote('')})" for name in inputs]
    if job.changes is not None:
        staged.append(f"({quote(CHANGES)} {quote('')})")
    if stage_image:
        staged.append(f"({quote(IMAGE)} {quote(job.image.resolve().as_uri())})")
    lines = [
        f"&(executable={quote(WRAPPER)})",
        f" (jobname={quote(job.name)})",
        f" (runtimeenvironment={quote(RTE)})",
        f' (walltime="{job.wall_seconds} seconds")',
        f' (memory="{memory_mib}")',
        f' (count="{job.cores}")(countpernode="{job.cores}")',
        f" (inputfiles={''.join(staged)})",
    ]
    if job.outputs:
        outputs = "".join(f"({quote(name)} {quote('')})" for name in job.outputs)
        lines.append(f" (outputfiles={outputs})")
    lines += [f" (stdout={quote(STDOUT)})(stderr={quote(STDERR)})", ' (gmlog="gmlog")']
    return "\n".join(lines) + "\n"

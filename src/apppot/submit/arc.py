"""NorduGrid ARC: the xRSL description of a job and the wrapper it runs (pure).

The job runs through the site's APPPOT runtime environment (src/apppot/data/rte/APPPOT-0, which a
site enables with `arcctl rte enable APPS/APPPOT-0`): it tells the job where the site keeps
apppot-start, its default image and kernel. The executable is a small wrapper, staged with the
job, that calls apppot-start in the job's session directory, so the job's exit status is ARC's.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from apppot.errors import HostError, UsageError
from apppot.proc import run, which
from apppot.submit.job import RECORD, STDERR, STDOUT, BatchJob, check_job_name

RTE = "APPS/APPPOT-0"
WRAPPER = "apppot-job.sh"
CHANGES = "apppot-changes.tar.gz"
IMAGE = "apppot.img"
GMLOG = "gmlog"
# The session directory's names that are AppPot's (and ARC's): an input of the same name would be
# overwritten by, or overwrite, the wrapper, the changes archive, the image or the job's streams.
RESERVED = (WRAPPER, CHANGES, IMAGE, STDOUT, STDERR, GMLOG, RECORD)


def quote(value: str) -> str:
    """An xRSL string: in double quotes, a double quote doubled."""
    return '"' + value.replace('"', '""') + '"'


def check_names(job: BatchJob) -> None:
    """Inputs and outputs travel by name in the xRSL: UTF-8 text without control characters, and
    no input may take one of the names AppPot stages itself."""
    for what, name in [*(("--input", n) for n in job.staged_names()), *(("--output", o) for o in job.outputs)]:
        try:
            name.encode()
        except UnicodeEncodeError:
            raise UsageError(f"{what} {name!r} is not UTF-8, which xRSL cannot carry; rename it") from None
        if not name.isprintable():
            raise UsageError(f"{what} {name!r} has a control character, which xRSL cannot carry; rename it")
        if what == "--input" and name in RESERVED:
            raise UsageError(f"--input {name!r} has the name of a file AppPot stages for ARC itself; rename it")


def render_wrapper(job: BatchJob) -> str:
    """The job's executable on the worker: apppot-start with the site's settings (from the RTE)."""
    # The runtime environment's settings are checked first: a site without them leaves nothing behind.
    check = ': "${APPPOT_START:?the site has no APPPOT runtime environment}"'
    if job.image is None:
        check += ' "${APPPOT_IMAGE:?the site\'s APPPOT runtime environment sets no image}"'
    image = IMAGE if job.image is not None else "$APPPOT_IMAGE"
    start = ['"$APPPOT_START"', "--image", f'"{image}"']
    start += ["--mem", f"{job.mem_bytes >> 20}M"]
    if job.changes is not None:
        start += ["--changes", CHANGES]
    restore = ""
    if job.executables:  # ARC's client uploads files without their modes
        restore = f"chmod u+x -- {shlex.join(job.executables)} || exit 125\n"
    return (
        "#!/bin/sh\n"
        "# An AppPot job on an ARC CE (rendered by apppot submit --to arc). The APPPOT runtime\n"
        "# environment says where apppot-start and the site's image are.\n"
        f"{check}\n"
        f"{restore}"
        f"{_KEEP_RECORD_APART}"
        # The record by environment, not --record: the site's apppot-start may be an AppPot without it.
        f'APPPOT_RECORD="$kept/record.json" {" ".join(start)} -- {shlex.join(job.argv)}\n'
        f"{_PUT_RECORD_IN_PLACE}"
    )


# The session directory is the job directory, which the job writes: AppPot's record is kept in a
# private directory outside it (not under a TMPDIR inside it) until apppot-start has ended. A signal
# of the batch system reaches apppot-start too; this shell waits for it to write its record.
_KEEP_RECORD_APART = f"""\
tmp=$(cd -P -- "${{TMPDIR:-/tmp}}" 2>/dev/null && pwd -P) || tmp=/tmp
case "$tmp/" in "$(pwd -P)"/*) tmp=/tmp ;; esac
kept=$(mktemp -d "$tmp/apppot-record.XXXXXXXX") || {{
    echo "{WRAPPER}: cannot make a directory in $tmp for the job's record" >&2
    exit 125
}}
trap : HUP INT TERM
"""
# Then whatever the job left under the record's name (a file, a link, a directory it made unwritable)
# is removed, and AppPot's record, if it wrote one, put there: never the job's own.
_PUT_RECORD_IN_PLACE = f"""\
status=$?
chmod u+w . 2>/dev/null
if [ -d {RECORD} ] && [ ! -L {RECORD} ]; then chmod -R u+w {RECORD} 2>/dev/null; fi
rm -rf -- {RECORD}
if [ -e {RECORD} ] || [ -L {RECORD} ] || {{ [ -f "$kept/record.json" ] && ! mv -f -- "$kept/record.json" {RECORD}; }}; then
    rm -f -- {RECORD}
    echo "{WRAPPER}: cannot put AppPot's record in place of the job's {RECORD} (apppot-start's status was $status)" >&2
    status=125
fi
rm -rf -- "$kept"
exit "$status"
"""


def render_xrsl(job: BatchJob) -> str:
    """The xRSL description: the wrapper, the runtime environment, resources and the files to move.

    Inputs are uploaded by the client from the submission directory (empty URLs); the image is
    staged from its path if the job names one, else the site's is used. Memory is per core in xRSL."""
    check_names(job)
    memory_mib = -(-job.batch_mem_mib() // job.cores)
    inputs = [WRAPPER, *job.staged_names()]
    staged = [f"({quote(name)} {quote('')})" for name in inputs]
    if job.changes is not None:
        staged.append(f"({quote(CHANGES)} {quote('')})")
    if job.image is not None:
        staged.append(f"({quote(IMAGE)} {quote(job.image.resolve().as_uri())})")
    lines = [
        f"&(executable={quote(WRAPPER)})",
        f" (jobname={quote(check_job_name(job.name))})",
        f" (runtimeenvironment={quote(RTE)})",
        f' (walltime="{job.wall_seconds} seconds")',
        f' (memory="{memory_mib}")',
        f' (count="{job.cores}")(countpernode="{job.cores}")',
        f" (inputfiles={''.join(staged)})",
    ]
    outputs = "".join(f"({quote(name)} {quote('')})" for name in (RECORD, *job.outputs))
    lines.append(f" (outputfiles={outputs})")
    lines += [f" (stdout={quote(STDOUT)})(stderr={quote(STDERR)})", f" (gmlog={quote(GMLOG)})"]
    return "\n".join(lines) + "\n"


# --- the ARC client tools -----------------------------------------------------------------------

# ARC's job states (arcstat) that will not change any more.
FINAL = {"Finished", "Failed", "Killed", "Deleted"}


def _require(program: str) -> str:
    found = which(program)
    if found is None:
        raise HostError(f"{program} is not installed: sudo apt-get install nordugrid-arc-client nordugrid-arc-plugins-arcrest")
    return found


def _tail(out: subprocess.CompletedProcess[bytes]) -> str:
    lines = (out.stdout + out.stderr).decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no message"


def submit(xrsl: Path, jobdir: Path, ce: str) -> str:
    """arcsub the description from the job directory (inputs are uploaded from there); returns the job URL."""
    out = run([_require("arcsub"), "-C", ce, "-T", "arcrest", str(xrsl)], cwd=jobdir, check=False, slow=f"the CE {ce} (arcsub)")
    found = re.search(r"Job submitted with jobid: (\S+)", out.stdout.decode(errors="replace"))
    if out.returncode != 0 or not found:
        raise HostError(f"arcsub to {ce} failed (is the CE up, and do you have a proxy: arcproxy?): {_tail(out)}")
    return found.group(1)


def parse_arcstat(text: str) -> tuple[str, int | None] | None:
    """(State, exit code) from arcstat's output."""
    state = re.search(r"^\s*State: (\w+)", text, re.M)
    code = re.search(r"^\s*Exit Code: (-?\d+)", text, re.M)
    if not state:
        return None
    return state.group(1), (int(code.group(1)) if code else None)


def status(url: str) -> tuple[str, int | None]:
    out = run([_require("arcstat"), url], check=False, slow="the ARC CE (arcstat)")
    parsed = parse_arcstat(out.stdout.decode(errors="replace"))
    if out.returncode != 0 or parsed is None:
        raise HostError(f"arcstat {url} failed: {_tail(out)}")
    return parsed


def download(url: str, into: Path) -> Path:
    """arcget the job's session directory (keeping it on the CE); returns where it landed."""
    into.mkdir(parents=True, exist_ok=True)
    out = run([_require("arcget"), "--keep", "-D", str(into), url], check=False, slow="the ARC CE (arcget)")
    if out.returncode != 0:
        raise HostError(f"arcget {url} failed: {_tail(out)}")
    landed = into / url.rstrip("/").rsplit("/", 1)[-1]
    return landed if landed.is_dir() and not landed.is_symlink() else into


def clean(url: str) -> None:
    """arcclean: remove the job and its files from the CE."""
    out = run([_require("arcclean"), url], check=False, slow="the ARC CE (arcclean)")
    if out.returncode != 0:
        raise HostError(f"arcclean {url} failed: {_tail(out)}")


def cancel(url: str) -> None:
    out = run([_require("arckill"), url], check=False, slow="the ARC CE (arckill)")
    if out.returncode != 0:
        raise HostError(f"arckill {url} failed: {_tail(out)}")

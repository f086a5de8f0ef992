"""The host-guest contract: what the host tells the guest agent, and how.

The kernel command line carries three words for the agent, ``apppot_ctl=PATH``,
``apppot_out=PATH`` and ``apppot_job=PATH``: the host paths of the control, report
and job directories. Having no dot, the kernel hands them to init as environment
variables, so the agent needs no command to find them. Data flows one way in each
of the first two: the control directory carries what the host sends and is
read-only to the guest; the report directory carries what the guest sends back,
which the host reads as hostile input (apppot.channel). The agent sources the file
``job`` in the control directory: a POSIX sh fragment rendered here, with every
value single-quoted and the command as ``set -- 'word' ...``, so any bytes but NUL
arrive exactly and no length limit of the kernel command line applies. It reads
stdin from ``stdin.N`` chunks, reports in ``stdin.read`` how many it has written into
the job's stdin pipe and, after the job, in ``stdin.left`` how many of those bytes the job
left unread (apppot.stdin); and it reports the job's exit status in the file ``status``.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from typing import NamedTuple

from apppot.errors import UsageError

# 4: a read-only control directory and a separate report directory (apppot_out);
# 5: the agent announces itself (AGENT_FILE) as soon as it has mounted the report directory.
PROTOCOL_VERSION = 5

# UML refuses a command line of 4096 bytes or more and appends " console=tty0"
# itself; keep a margin for that.
KERNEL_CMDLINE_LIMIT = 4000

CTL_PARAM = "apppot_ctl"  # host -> guest, read-only to the guest
OUT_PARAM = "apppot_out"  # guest -> host: the report directory
JOB_PARAM = "apppot_job"
CHANGES_PARAM = "apppot_changes"  # =1: merge the changes in the control directory before mounting the job directory
FS_PARAM = "apppot_fs"  # =9p: apppot_ctl and apppot_job name virtio 9p tags (QEMU), not hostfs paths (UML)
TTY_PARAM = "apppot_tty"  # the interactive terminal's device, where it is not tty1 (QEMU: ttyS3)
USER_DATA_MAGIC = b"#apppot-job\n"  # the first line of cloud user-data carrying a job
JOB_FILE = "job"
# In the control directory (host -> guest).
STDIN_CHUNK = "stdin.{}"
STDIN_END = "stdin.end"  # the number of stdin chunks; with stdin.file, its size in bytes
STDIN_FILE = "stdin.file"  # the rest of a host stdin that is a regular file: the job's stdin, seekable
# In the report directory (guest -> host): the only names the host reads there.
STATUS_FILE = "status"
AGENT_FILE = "agent"  # the agent's first report, as soon as it has mounted the report directory: the boot worked
STDIN_READ = "stdin.read"  # how many stdin chunks the guest has written in full into the job's stdin pipe
STDIN_LEFT = "stdin.left"  # after the job: how many bytes of those chunks the job left unread
STDIN_POS = "stdin.pos"  # after the job: where in stdin.file the job stopped reading
REPORT_LIMIT = 64  # bytes: a report is one small number; more is the guest misbehaving
# A changes archive to merge at boot, checked by the host: the archive, its deletions (one path
# per line, relative to /) and the base id it needs.
CHANGES_ARCHIVE = "changes.tar"  # uncompressed, only the checked members (apppot.snap.repack)
CHANGES_DELETE = "changes.delete"
CHANGES_BASE = "changes.base"

_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_TERM = re.compile(r"[A-Za-z0-9._+-]{1,64}")
_IFNAME = re.compile(r"[a-z][a-z0-9]{0,14}")
_PATH = re.compile(r"/[^\s\"]*")
_TAG = re.compile(r"[a-z][a-z0-9_]{0,30}")


class StdinMode(StrEnum):
    """Where the job's standard input comes from inside the guest."""

    NULL = "null"  # /dev/null
    SPOOL = "spool"  # a pipe fed from chunk files the host writes into the control directory
    TTY = "tty"  # the interactive terminal (tty1)
    FILE = "file"  # a regular file in the control directory, the rest of the host's stdin file


class StreamMode(StrEnum):
    """What the job's stdout or stderr is inside the guest."""

    PIPE = "pipe"  # the host's stream is not a terminal: the job gets a pipe
    TTY = "tty"  # the host's stream is a terminal: the job gets a terminal
    # stderr only: the host's fd 1 and 2 are one open file (`>log 2>&1`), so the job's stderr is its
    # stdout (2>&1 inside) and both cross on the stdout channel, in the order they were written. An
    # agent older than this value sends stderr on its own channel, to the same host file.
    STDOUT = "stdout"


class GuestJob(NamedTuple):
    """What the guest agent needs to know to run one job."""

    argv: tuple[str, ...] | None
    uid: int = 0
    gid: int = 0
    user: str = "user"
    group: str = "user"
    stdin: StdinMode = StdinMode.NULL
    stdout: StreamMode = StreamMode.PIPE
    stderr: StreamMode = StreamMode.PIPE
    interactive: bool = False
    term: str | None = None
    rows: int | None = None
    cols: int | None = None
    net: str | None = None  # the guest's network interface, e.g. eth0 or vec0
    net_configured: bool = False  # the kernel configured it already (ip= parameter)
    keep_cow: bool = False  # the COW outlives the job (--cow): the guest must flush it


def quote_word(word: bytes) -> bytes:
    """Quote one argument for POSIX sh: single quotes, with ' written as '\\''."""
    return b"'" + word.replace(b"'", b"'\\''") + b"'"


def _quote(value: str | int) -> str:
    return quote_word(str(value).encode()).decode()


def render_command(argv: tuple[str, ...]) -> bytes:
    """The command as a `set -- 'word' ...` line for the agent to source."""
    words = []
    for position, arg in enumerate(argv):
        raw = os.fsencode(arg)
        if b"\0" in raw:
            raise UsageError(f"argument {position} of the command contains a NUL byte, which no program can receive")
        words.append(quote_word(raw))
    return b"set -- " + b" ".join(words) + b"\n"


def _check(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        raise UsageError(f"invalid {what} {value!r}: use letters, digits and - _ only")
    return value


def check_name(value: str, what: str) -> str:
    """A user or group name the guest's agent can create (`what`: "user" or "group"), else UsageError."""
    return _check(value, _NAME, f"{what} name")


def render_kernel_params(ctl_path: str, out_path: str, job_path: str, changes: bool = False, ninep: bool = False) -> list[str]:
    """The kernel parameters the agent reads: where the control, report and job directories are (host
    paths as UML sees them, or with ``ninep`` the tags of QEMU's 9p shares), and whether a changes
    archive waits in the control directory."""
    pattern, what = (_TAG, "9p tag") if ninep else (_PATH, "path")
    params = [
        f"{CTL_PARAM}={_check(ctl_path, pattern, f'control {what}')}",
        f"{OUT_PARAM}={_check(out_path, pattern, f'report {what}')}",
        f"{JOB_PARAM}={_check(job_path, pattern, f'job {what}')}",
    ]
    if ninep:
        params.append(f"{FS_PARAM}=9p")
    return [*params, f"{CHANGES_PARAM}=1"] if changes else params


def render_job_file(job: GuestJob) -> bytes:
    """The control directory's ``job`` file: settings as sh assignments, then the command."""
    if not job.argv and job.argv is not None:
        raise UsageError("the command after -- is empty: give a program to run")
    settings: dict[str, str | int] = {
        "A_V": PROTOCOL_VERSION,
        "A_UID": job.uid,
        "A_GID": job.gid,
        "A_USER": check_name(job.user, "user"),
        "A_GROUP": check_name(job.group, "group"),
        "A_STDIN": job.stdin.value,
        "A_STDOUT": job.stdout.value,
        "A_STDERR": job.stderr.value,
        "A_TTY": int(job.interactive),
        "A_KEEP_COW": int(job.keep_cow),
    }
    if job.term:
        settings["A_TERM"] = _check(job.term, _TERM, "TERM value")
    if job.rows and job.cols:
        settings["A_ROWS"], settings["A_COLS"] = job.rows, job.cols
    if job.net:
        settings["A_NET"] = _check(job.net, _IFNAME, "network interface")
        settings["A_NET_UP"] = int(job.net_configured)
    text = "".join(f"{key}={_quote(value)}\n" for key, value in settings.items()).encode()
    if job.argv is not None:
        text += b"A_ARGV=1\n" + render_command(job.argv)
    return text


def render_user_data(job: GuestJob) -> bytes:
    """Cloud user-data carrying a job: the marker line, then the job file. The job's stdin and
    terminal are the host's no more: it reads nothing and writes to the console."""
    return USER_DATA_MAGIC + render_job_file(job._replace(stdin=StdinMode.NULL, interactive=False, term=None))


def parse_count(data: bytes, limit: int) -> int | None:
    """A number 0..limit the agent reported (digits and a newline), or None if malformed."""
    text = data.strip(b"\n")
    if not text.isdigit() or len(text) > len(str(limit)):  # isdigit on bytes: ASCII digits only
        return None
    value = int(text)
    return value if value <= limit else None


def parse_status(data: bytes) -> int | None:
    """The job's exit status from the agent's status file, or None if malformed."""
    return parse_count(data, 255)

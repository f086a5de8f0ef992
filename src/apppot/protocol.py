"""The host-guest contract: what the host tells the guest agent, and how.

Everything travels as ``apppot.KEY=VALUE`` words on the kernel command line,
rendered here and decoded by the agent (``guest/apppot-init``). Values never
contain blanks. The command is a list of POSIX-sh quoted words, base64 encoded,
so no quoting reaches the kernel command line; when the whole command line
would pass the kernel's limit, the encoded command goes to a file in the
control directory instead (``apppot.argvfile``).
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum

from apppot.errors import UsageError

PROTOCOL_VERSION = 1

# UML refuses a command line of 4096 bytes or more and appends " console=tty0"
# itself; keep a margin for that.
KERNEL_CMDLINE_LIMIT = 4000

ARGV_FILE = "argv"
STATUS_FILE = "status"
STDIN_CHUNK = "stdin.{}"
STDIN_END = "stdin.end"

_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_TERM = re.compile(r"[A-Za-z0-9._+-]{1,64}")
_PATH = re.compile(r"/[^\s\"]*")


class StdinMode(StrEnum):
    """Where the job's standard input comes from inside the guest."""

    NULL = "null"  # /dev/null
    SPOOL = "spool"  # chunk files the host writes into the control directory
    TTY = "tty"  # the interactive terminal (tty1)


class StreamMode(StrEnum):
    """What the job's stdout or stderr is inside the guest."""

    PIPE = "pipe"  # the host's stream is not a terminal: the job gets a pipe
    TTY = "tty"  # the host's stream is a terminal: the job gets a terminal


@dataclass(frozen=True)
class GuestJob:
    """What the guest agent needs to know to run one job."""

    ctl_path: str
    job_path: str
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
    net: bool = False


@dataclass(frozen=True)
class RenderedJob:
    """Kernel parameters for the guest, and files to put in the control directory."""

    params: list[str]
    files: dict[str, bytes] = field(default_factory=dict)


def quote_word(word: bytes) -> bytes:
    """Quote one argument for POSIX sh: single quotes, with ' written as '\\''."""
    return b"'" + word.replace(b"'", b"'\\''") + b"'"


def encode_argv(argv: tuple[str, ...]) -> str:
    """Encode a command for the agent: base64 of its sh-quoted words."""
    words = []
    for position, arg in enumerate(argv):
        raw = os.fsencode(arg)
        if b"\0" in raw:
            raise UsageError(f"argument {position} of the command contains a NUL byte, which no program can receive")
        words.append(quote_word(raw))
    return base64.b64encode(b" ".join(words)).decode("ascii")


def _check(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        raise UsageError(f"invalid {what} {value!r}: use letters, digits and - _ only")
    return value


def render_guest_params(job: GuestJob, budget: int = KERNEL_CMDLINE_LIMIT) -> RenderedJob:
    """Render the job as apppot.* kernel parameters.

    ``budget`` is how many bytes of the kernel command line these parameters may
    take; past it the command spills into a file of the control directory.
    """
    if not job.argv and job.argv is not None:
        raise UsageError("the command after -- is empty: give a program to run")
    params = [
        f"apppot.v={PROTOCOL_VERSION}",
        f"apppot.ctl={_check(job.ctl_path, _PATH, 'control path')}",
        f"apppot.job={_check(job.job_path, _PATH, 'job path')}",
        f"apppot.uid={job.uid:d}",
        f"apppot.gid={job.gid:d}",
        f"apppot.user={_check(job.user, _NAME, 'user name')}",
        f"apppot.group={_check(job.group, _NAME, 'group name')}",
        f"apppot.stdin={job.stdin}",
        f"apppot.stdout={job.stdout}",
        f"apppot.stderr={job.stderr}",
    ]
    if job.interactive:
        params.append("apppot.tty=1")
    if job.term:
        params.append(f"apppot.term={_check(job.term, _TERM, 'TERM value')}")
    if job.rows and job.cols:
        params += [f"apppot.rows={job.rows:d}", f"apppot.cols={job.cols:d}"]
    if job.net:
        params.append("apppot.net=1")
    files: dict[str, bytes] = {}
    if job.argv is not None:
        encoded = encode_argv(job.argv)
        inline = f"apppot.argv={encoded}"
        if len(" ".join([*params, inline])) <= budget:
            params.append(inline)
        else:
            files[ARGV_FILE] = encoded.encode("ascii")
            params.append(f"apppot.argvfile={ARGV_FILE}")
    return RenderedJob(params=params, files=files)


def parse_status(text: str) -> int | None:
    """The job's exit status from the agent's status file, or None if malformed."""
    text = text.strip()
    if not text.isdigit():
        return None
    value = int(text)
    return value if 0 <= value <= 255 else None

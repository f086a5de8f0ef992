"""The batch job model: what `apppot submit` hands to a batch system, independent of the target."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from apppot.errors import UsageError
from apppot.spec import MIB
from apppot.submit.command_file import CommandFile

# What a job needs besides the guest's memory, measured with the tiny appliance and AppPot's
# kernel: the resident set of apppot start, bwrap, the UML kernel and the NAT, summed over the
# process tree, is the memory the guest touched plus 42 MiB. We ask for 64 MiB more.
UML_OVERHEAD = 64 * MIB
DEFAULT_WALL_SECONDS = 3600
# Where the batch job's own stdout and stderr land, and the names `apppot fetch` gives them in ./JOBID/.
STDOUT = "stdout.txt"
STDERR = "stderr.txt"
RECORD = "apppot-record.json"  # the job's provenance record (apppot start --record), fetched beside them
# A job name goes into #SBATCH lines and xRSL: a word, so that it can neither end a line nor be parsed.
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


class BatchJob(NamedTuple):
    """One AppPot job for a batch system."""

    argv: tuple[str, ...]
    image: Path | None  # absolute: workers read it where the submitter sees it; None: the site's (ARC)
    mem_bytes: int  # the guest's memory
    wall_seconds: int = DEFAULT_WALL_SECONDS
    cores: int = 1
    changes: Path | None = None
    inputs: tuple[Path, ...] = ()
    outputs: tuple[str, ...] = ()  # paths relative to the job directory
    name: str = "apppot"
    command_file: CommandFile | None = None  # the script the command runs, staged like an input
    executables: tuple[str, ...] = ()  # staged names that had an execute bit at submit
    verify: bool = False  # the image was chosen by name or content id: the worker checks it against its record

    def staged_names(self) -> list[str]:
        """The names in the job directory of what is staged from the submit host (the changes
        archive aside): the inputs, then the command's script."""
        return [*(p.name for p in self.inputs), *([self.command_file.name] if self.command_file else [])]

    def batch_mem_mib(self) -> int:
        """The memory to ask of the batch system: the guest's plus UML's own, in MiB (rounded up)."""
        return -(-(self.mem_bytes + UML_OVERHEAD) // MIB)


def parse_wall_time(text: str) -> int:
    """Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS -> seconds."""
    value = text.strip()
    days = 0
    if "-" in value:
        day_text, _, value = value.partition("-")
        if not day_text.isdigit():
            raise UsageError(f"invalid --time {text!r}: write it like 30 (minutes), 2:00:00 or 1-12:00:00")
        days = int(day_text)
    parts = value.split(":")
    if not all(p.isdigit() for p in parts) or len(parts) > 3:
        raise UsageError(f"invalid --time {text!r}: write it like 30 (minutes), 2:00:00 or 1-12:00:00")
    numbers = [int(p) for p in parts]
    if days or "-" in text:
        hours, minutes, seconds = [*numbers, 0, 0][:3]  # D-HH, D-HH:MM, D-HH:MM:SS
    elif len(numbers) == 1:
        hours, minutes, seconds = 0, numbers[0], 0  # MM
    elif len(numbers) == 2:
        hours, minutes, seconds = 0, numbers[0], numbers[1]  # MM:SS
    else:
        hours, minutes, seconds = numbers
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise UsageError(f"invalid --time {text!r}: it must be more than zero")
    return total


def format_wall_time(seconds: int) -> str:
    """Seconds -> D-HH:MM:SS (or HH:MM:SS under a day), as Slurm and xRSL both read it."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


def check_output_name(name: str) -> str:
    """An output is a path inside the job directory, not one of the names fetch gives stdout and stderr."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts:
        raise UsageError(f"invalid --output {name!r}: name a file inside the job directory, without '..'")
    if str(pure) in (STDOUT, STDERR, RECORD):
        what = "record" if str(pure) == RECORD else pure.stem
        raise UsageError(f"invalid --output {name!r}: the job's {what} is fetched under that name; rename the file")
    return str(pure)


def check_job_name(name: str) -> str:
    """A job name batch systems read as one word."""
    if not _JOB_NAME.fullmatch(name):
        raise UsageError(f"invalid --name {name!r}: use up to 64 letters, digits and . _ + - (starting with a letter or digit)")
    return name

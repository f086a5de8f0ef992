"""The file a submitted command runs, staged with the job as the user expects it to be.

`apppot submit ... -- ./run.sh data.in` runs ./run.sh in the job directory on the worker, so the
script must travel with the job like an --input. Staged, from the submit directory:

- the command itself when its first word is a relative path with a slash (`./run.sh`, `bin/run`):
  it can only mean a file in the job directory; if it is not there, the submission is refused;
- the first argument of an interpreter (`sh run.sh`, `python3 bin/fit.py`) when it names a file
  there; anything else (an option, `-c`, a file the job itself will make) is left alone.

A bare word (`count-words`) is looked up on the guest's PATH, an absolute path is the image's: neither
is staged. A link anywhere on the way, a directory, a FIFO or a device is refused, never followed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from apppot.errors import UsageError
from apppot.submit import results

# Programs whose first argument is the script they run.
INTERPRETERS = frozenset({"sh", "bash", "dash", "ksh", "zsh", "python", "python3", "perl", "Rscript", "ruby"})


class CommandFile(NamedTuple):
    name: str  # relative path in the job directory, e.g. run.sh or bin/run
    source: Path  # where it is in the submit directory
    executable: bool  # had an execute bit at submit: ARC's staging loses it, the job's wrapper restores it


def find(argv: Sequence[str], submit_dir: Path, inputs: frozenset[str] = frozenset()) -> CommandFile | None:
    """The file of the submit directory the command runs, checked; None when it names none, or names
    one of ``inputs`` (the job directory's names of the --input files, which are staged as they are)."""
    if not argv:
        return None
    first = argv[0]
    if "/" in first and not first.startswith("/"):
        found = None if str(PurePosixPath(first)) in inputs else _look_up(first, submit_dir, required=True)
    elif PurePosixPath(first).name in INTERPRETERS and len(argv) > 1 and not argv[1].startswith(("-", "/")):
        found = None if str(PurePosixPath(argv[1])) in inputs else _look_up(argv[1], submit_dir, required=False)
    else:
        found = None
    return found


def _look_up(word: str, submit_dir: Path, required: bool) -> CommandFile | None:
    pure = PurePosixPath(word)
    if ".." in pure.parts:
        if not required:
            return None
        raise UsageError(
            f"the command {word!r} names a file outside the submit directory, which the job cannot see: "
            "copy it here and run it as ./NAME"
        )
    name = str(pure)
    root = os.open(submit_dir, results.DIR_FLAGS)
    try:
        fd, st = results.open_regular_file(root, name)
    except results.Missing:
        if not required:
            return None
        raise UsageError(
            f"the command {word!r} is not a file in {submit_dir}: the job runs it from its job directory, "
            "so create it here or give it with --input"
        ) from None
    except results.Refusal as e:
        raise UsageError(f"the command {word!r} cannot be staged: {e}; give a regular file of the submit directory") from None
    finally:
        os.close(root)
    os.close(fd)
    return CommandFile(name, submit_dir / name, bool(st.st_mode & stat.S_IXUSR))

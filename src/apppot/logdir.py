"""Where console logs go: the user's state directory, never the cache, which may be read-only or shared.

$XDG_STATE_HOME/apppot/logs, or ~/.local/state/apppot/logs. Where that cannot be made or written (a
read-only home), a private directory of the user's beside the run directories; failing that too, the
job's own run directory (the log then goes with it): a log never stops a job.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from apppot import userpath
from apppot.errors import HostError


def state_logs_dir() -> Path:
    """$XDG_STATE_HOME/apppot/logs, or ~/.local/state/apppot/logs (a relative $XDG_STATE_HOME is ignored, as XDG says)."""
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        base = str(Path.home() / ".local" / "state")
    return Path(base) / "apppot" / "logs"


def log_dirs(run_base: Path, jobdir: Path) -> list[Path]:
    """The places a console log may go, in order of preference (the run directory aside). The state
    directory is passed over when it is in the job directory (as when HOME is the job's, on ARC): the
    job could have made it, or a parent of it, a link to anywhere the user may write."""
    state = state_logs_dir()
    job = jobdir.resolve()
    inside = state.absolute().is_relative_to(job) or state.resolve().is_relative_to(job)
    return [*([] if inside else [state]), run_base / f"apppot-logs-{os.geteuid()}"]


def open_log(file_name: str, run_base: Path, run_dir: Path, jobdir: Path) -> tuple[int, Path]:
    """A descriptor for a new console log, and its path: in the first of log_dirs() that works, else in run_dir."""
    for directory in [*log_dirs(run_base, jobdir), run_dir]:
        with contextlib.suppress(OSError, HostError):
            _private_dir(directory)
            path = directory / file_name
            return userpath.open_for_writing(path, "the console log", HostError, "set XDG_STATE_HOME"), path
    raise HostError(f"cannot write a console log in {run_dir}; set TMPDIR to a writable directory")


def stale_logs(run_base: Path, jobdir: Path, run_name: str) -> list[Path]:
    """The console logs of the run directory run_name, left by an AppPot that was killed: only in log
    directories that are private directories of the user's (never through a link another user made)."""
    found: list[Path] = []
    for directory in log_dirs(run_base, jobdir):
        with contextlib.suppress(OSError, HostError):
            _check_private(directory)
            found += directory.glob(f"*-{run_name}.log")
    return found


def _private_dir(directory: Path) -> None:
    """directory made 0700 if missing; an existing one must be the user's own directory, not a link, private
    (the fallback sits in a shared directory such as /tmp, where another user could have made it first)."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=True)
    _check_private(directory)


def _check_private(directory: Path) -> None:
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise HostError(f"{directory} is not a private directory of yours")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied", str(directory))

"""Which host directory a job may get: the one place the guest can write on the host.

The guest writes there freely (it may be root inside and the job malicious), so nothing
AppPot reads or runs may live in it: not the cache (it holds the list of host files the
sandbox binds), not the run directories, not the kernel. And a directory the user would
not hand to an untrusted program (/, a system directory, the whole home) needs
--unsafe-jobdir.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from apppot.errors import JobDirError

UNSAFE_FLAG = "--unsafe-jobdir"
# Never a job directory themselves; everything beneath them neither.
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys", "/usr")
# Shared by everyone or holding everyone's homes: a subdirectory is fine, the directory itself is not.
_SHARED = ("/", "/home", "/opt", "/root", "/run", "/srv", "/tmp", "/var", "/var/tmp", "/mnt", "/media")


def check_jobdir(path: Path, unsafe_ok: bool = False) -> Path:
    """The job directory, resolved: it exists, is yours to write, and is not a place to hand to a job."""
    try:
        is_dir = stat.S_ISDIR(path.stat().st_mode)
    except FileNotFoundError:
        is_dir = False
    except PermissionError:
        raise JobDirError(f"job directory {path} is not reachable by you; fix the permissions of its parents") from None
    except OSError as e:  # e.g. the current directory was deleted
        raise JobDirError(f"job directory {path} cannot be used ({e.strerror}); pass --jobdir DIR") from None
    if not is_dir:
        raise JobDirError(f"job directory {path} does not exist or is not a directory; create it or pass --jobdir DIR")
    resolved = path.resolve()
    if not unsafe_ok and (why := _unsafe(resolved)):
        raise JobDirError(
            f"job directory {resolved} is {why}, and the job could change anything in it: "
            f"run the job in a directory of its own (--jobdir DIR), or pass {UNSAFE_FLAG} if you mean it"
        )
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise JobDirError(f"job directory {path} is not writable by you; fix its permissions or pass another --jobdir")
    return resolved


def _unsafe(jobdir: Path) -> str | None:
    text = str(jobdir)
    if text in _SHARED:
        return "the root directory" if text == "/" else "a system directory shared by all users"
    if any(text == tree or text.startswith(tree + "/") for tree in _SYSTEM_TREES):
        return "a system directory"
    for home in _homes():
        if jobdir == home:
            return "your whole home directory"
        if home.is_relative_to(jobdir):
            return f"a directory holding your home directory {home}"
    return None


def _homes() -> set[Path]:
    """The home the password database names; $HOME only where it names none. Not $HOME besides: a
    batch system may set it to the job's own directory (ARC sets it to the session directory)."""
    home = _passwd_home() or os.environ.get("HOME", "")
    return {Path(home).resolve()} if os.path.isabs(home) else set()


def _passwd_home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return ""


def check_outside(jobdir: Path, path: Path, what: str, fix: str) -> None:
    """Refuse ``path`` (something the host reads or runs) inside the job directory."""
    resolved = path.resolve()
    if resolved.is_relative_to(jobdir):
        raise JobDirError(f"{what} {resolved} is inside the job directory {jobdir}, where the job could change it: {fix}")


def check_not_in_cache(jobdir: Path, cache: Path) -> None:
    """Refuse a job directory inside AppPot's cache, but for the job directory of a submitted job (jobs/ID/job):
    the cache holds what the next job's sandbox is made of."""
    cache = cache.resolve()
    if not jobdir.is_relative_to(cache):
        return
    parts = jobdir.relative_to(cache).parts
    if len(parts) >= 3 and parts[0] == "jobs" and parts[2] == "job":
        return
    raise JobDirError(
        f"job directory {jobdir} is inside AppPot's cache {cache}, whose files decide what later jobs see: "
        "run the job in a directory of its own (--jobdir DIR)"
    )

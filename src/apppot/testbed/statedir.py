"""The test cluster's state directory, checked before root uses it.

Root's daemons read their configuration from it and root runs scripts from it, so whoever can change
it, or any directory on the way to it, controls root. The default, /var/lib/apppot-testbed, sits where
only root can create it; a directory given in $APPPOT_TESTBED_DIR must be as safe: owned by the user
who runs the testbed, writable by nobody else, not a link, and reached only through directories owned
by root or that user and writable by nobody else (a sticky directory such as /tmp is fine: nobody else
can rename or remove what is in it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from apppot.errors import HostError

DEFAULT = Path("/var/lib/apppot-testbed")
ENV = "APPPOT_TESTBED_DIR"
# Slurm and ARC write these paths into configuration files and shell and Perl lines without quoting.
SAFE_PATH = re.compile(r"/[A-Za-z0-9._/-]*")
MODE = 0o755  # the users whose jobs the cluster runs read slurm.conf and run site/bin/apppot from it


def testbed_dir() -> Path:
    """Where the test cluster lives: $APPPOT_TESTBED_DIR (made absolute) or the default."""
    return Path(os.path.abspath(os.environ.get(ENV) or DEFAULT))


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _refuse(path: Path, problem: str) -> HostError:
    return HostError(f"the test cluster's directory {path} {problem}: remove it, or set {ENV} to a directory of your own")


def check_ancestors(directory: Path) -> Path:
    """directory with its parent's links resolved, once every directory above it is safe (see above)."""
    if not SAFE_PATH.fullmatch(str(directory)) or directory == Path("/"):
        raise HostError(
            f"the test cluster's directory {directory} is not a directory path of letters, digits, '.', '_', '-' "
            f"and '/' (Slurm and ARC cannot carry other characters): set {ENV} to another one"
        )
    parent = Path(os.path.realpath(directory.parent))
    if not parent.is_dir():
        raise HostError(f"{parent}, where the test cluster's directory would be, is not a directory: make it, or set {ENV}")
    me = os.geteuid()
    for above in [parent, *parent.parents]:
        st = os.lstat(above)
        if st.st_uid not in (0, me):
            raise _refuse(directory, f"is inside {above}, which belongs to {_user(st.st_uid)}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise _refuse(directory, f"is inside {above}, which other users can write to")
    return parent / directory.name


def _check_own(path: Path) -> os.stat_result | None:
    """The status of path (its ancestors checked) once it is safe to use; None if it does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is not a directory")
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"belongs to {_user(st.st_uid)}, not to {_user(os.geteuid())}")
    if st.st_mode & 0o022:
        raise _refuse(path, f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})")
    return st


def existing(directory: Path) -> Path | None:
    """The checked directory, or None if there is none (nothing to stop)."""
    if not os.path.isdir(directory.parent):
        return None
    path = check_ancestors(directory)
    return path if _check_own(path) is not None else None


def prepare(directory: Path) -> Path:
    """The checked directory, made if missing, with mode 0755."""
    path = check_ancestors(directory)
    if _check_own(path) is None:
        with contextlib.suppress(FileExistsError):  # made meanwhile: the check below decides
            os.mkdir(path, MODE)
        _check_own(path)
    os.chmod(path, MODE)  # checked: only this user can have put anything at this name
    return path


@contextlib.contextmanager
def owner_writable_only() -> Iterator[None]:
    """Nothing made meanwhile, here or by daemons started meanwhile, is group- or world-writable."""
    umask = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(umask)

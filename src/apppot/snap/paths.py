"""Where apppot-snap keeps its state, and which paths are never part of a system's state."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path

VERSION = "2"  # 2: manifests and archives carry xattrs; archives may hold PAX sparse 1.0 members
STATE_DIR = "/var/lib/apppot"
BASE_MANIFEST = f"{STATE_DIR}/base.manifest.gz"
BASE_ID = f"{STATE_DIR}/base.id"
# The lines the agent added to /etc/passwd, /etc/group and /etc/shadow at the last boot (one file each).
AGENT_LINES_DIR = f"{STATE_DIR}/agent"
EXCLUDE_FILE = "/etc/apppot/snap.exclude"
MANIFEST_MEMBER = ".apppot-changes.json"
JOB_DIR = "/home/user/job"
DEFAULT_CHANGES_NAME = "apppot.{date}.changes.tar.gz"
# Never part of a system's state: kernel views, scratch space, the job directory, our own state.
ALWAYS_EXCLUDED = ("/proc", "/sys", "/dev", "/run", "/tmp", JOB_DIR, STATE_DIR, "/" + MANIFEST_MEMBER, "/lost+found")
# Shipped in images as /etc/apppot/snap.exclude, which the image's owner may edit. A line with
# * ? or [ is a pattern over the whole path (* matches / too).
DEFAULT_EXCLUDES = """\
# Paths apppot-snap leaves out of base states and changes, one per line (subtrees included).
# A line with * ? or [ is a pattern matched against the whole path (* also matches /).
/var/cache/apt
/var/lib/apt/lists
/var/log
/var/tmp
/var/cache/debconf/templates.dat-old
/etc/resolv.conf
/etc/sudoers.d/apppot
/root/.cache
/home/user/.cache
# Shell and tool histories: what was typed, not what was installed.
/root/.*_history
/root/.lesshst
/root/.viminfo
/home/*/.*_history
/home/*/.lesshst
/home/*/.viminfo
/home/*/.sudo_as_admin_successful
"""
FILE, DIR, LINK, OTHER = "f", "d", "l", "o"


class SnapError(Exception):
    """A problem apppot-snap explains in one line."""


def read_excludes(root: str = "/") -> list[str]:
    paths = list(ALWAYS_EXCLUDED)
    try:
        text = Path(root, EXCLUDE_FILE.lstrip("/")).read_text()
    except FileNotFoundError:
        text = DEFAULT_EXCLUDES
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            paths.append("/" + line.strip("/"))
    return paths


def _is_pattern(exclude: str) -> bool:
    return any(c in exclude for c in "*?[")


def is_excluded(path: str, excludes: Iterable[str]) -> bool:
    for x in excludes:
        if _is_pattern(x):
            if fnmatch.fnmatchcase(path, x) or fnmatch.fnmatchcase(path, x.rstrip("/") + "/*"):
                return True
        elif path == x or path.startswith(x.rstrip("/") + "/"):
            return True
    return False

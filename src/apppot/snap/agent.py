"""What the AppPot agent changes at every boot, which is no change of the user's.

For a non-root job the agent appends the job's user to /etc/passwd, /etc/group and /etc/shadow (for
the host's uid and gid, which differ between users and hosts), records each line it added in
/var/lib/apppot/agent/, and gives /home/user to that user. apppot-snap takes those files without the
recorded lines, which is the content the user would have had without the agent: a user's own
accounts (sudo useradd bob) are still changes and are carried, the agent's never are; and
/home/user's owner, and the three files' times, are never a change."""

from __future__ import annotations

import os
import posixpath

from .paths import AGENT_LINES_DIR

AGENT_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow")
AGENT_HOME = "/home/user"
MAX_ACCOUNTS_FILE = 16 << 20  # an /etc/passwd larger than this is taken as it is


def agent_lines(root: str) -> dict[str, bytes]:
    """The line the agent added to each of its files at the last boot (none on a system it never ran)."""
    lines = {}
    for path in AGENT_FILES:
        record = os.path.join(root, AGENT_LINES_DIR.lstrip("/"), posixpath.basename(path))
        try:
            with open(record, "rb") as f:
                line = f.read(4096).strip(b"\n")
        except (FileNotFoundError, NotADirectoryError):
            continue
        if line and b"\n" not in line:
            lines[path] = line
    return lines


def without(data: bytes, line: bytes) -> bytes:
    """data without every line equal to line."""
    kept = [x for x in data.splitlines(keepends=True) if x.rstrip(b"\n") != line]
    return b"".join(kept)


def pristine(real: str, line: bytes) -> bytes | None:
    """An agent file's content without the agent's line, or None if it is too large to hold."""
    with open(real, "rb") as f:
        data = f.read(MAX_ACCOUNTS_FILE + 1)
    return None if len(data) > MAX_ACCOUNTS_FILE else without(data, line)

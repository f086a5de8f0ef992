"""Notices about a condition of this host that no job changes (KVM does not work, no namespaces for
isolation): said where a human watches (stderr a terminal), once per condition, host and cache; under
-v every time; otherwise never. A job's stderr is the job's: a batch job, whose cache may be new every
time (ARC: HOME is the session directory), and a wrapper that promises the program's own output
(examples/glpk/glpsol-apppot) never have them; `apppot doctor` shows these conditions at any time.
"""

from __future__ import annotations

import socket

from apppot.hostcache import cached
from apppot.say import Say

ONCE_SUFFIX = " (said once on this host; -v says it every time; apppot doctor shows it)"


def say_once(message: str, say: Say, *, verbose: bool, watched: bool) -> None:
    """Say ``message`` under -v; else, where ``watched`` (stderr is a terminal), if it was never said
    with this cache on this host. Unwatched, nothing is said nor remembered."""
    if verbose:
        say(message)
        return
    if not watched:
        return

    def first_time() -> dict[str, bool]:
        say(message + ONCE_SUFFIX)
        return {"said": True}

    cached("said", [socket.gethostname(), message], first_time)

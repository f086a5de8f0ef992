"""Notices about a condition of this host that no job changes (KVM does not work, no namespaces for
isolation): said once per condition, host and cache, then only under -v. A job's stderr is the job's, so
a wrapper that promises the program's own output (examples/glpk/glpsol-apppot) keeps that promise from
the second run on; `apppot doctor` shows these conditions at any time.
"""

from __future__ import annotations

import socket

from apppot.hostcache import cached
from apppot.say import Say

ONCE_SUFFIX = " (said once on this host; -v says it every time)"


def say_once(message: str, say: Say, *, verbose: bool) -> None:
    """Say ``message`` if it was never said with this cache on this host, or under -v."""
    if verbose:
        say(message)
        return

    def first_time() -> dict[str, bool]:
        say(message + ONCE_SUFFIX)
        return {"said": True}

    cached("said", [socket.gethostname(), message], first_time)

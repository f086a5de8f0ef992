"""Which host CPU a guest runs on.

A UML guest is one virtual CPU spread over several host processes: the kernel and one process
per guest process, which hand every system call to each other. On a virtual machine, a hand-over
to another host CPU costs an inter-processor interrupt, which the hypervisor makes slow: we
measured 70 us per guest system call unpinned against 4.5 us with the whole guest on one CPU.
So the guest is pinned, by default to the CPU the scheduler has just put `apppot start` on
(Linux balances load when a program starts), which spreads concurrent jobs the way it would.
"""

from __future__ import annotations

from collections.abc import Set
from pathlib import Path

from apppot.errors import UsageError

AUTO = "auto"
ALL = "all"


def current_cpu(stat_path: Path = Path("/proc/self/stat")) -> int | None:
    """The CPU this process last ran on (field 39 of /proc/self/stat), or None if unknown."""
    try:
        text = stat_path.read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    # fields[0] is field 3 (state), so field 39 is fields[36]
    try:
        return int(fields[36])
    except (IndexError, ValueError):
        return None


def choose_cpu(requested: str | None, allowed: Set[int], current: int | None) -> int | None:
    """The CPU to pin the guest to, or None to leave it where the host put it.

    requested: None or "auto" (pin to `current`), "all" (no pinning), or a CPU number."""
    wanted = AUTO if requested is None else requested.strip().lower()
    if wanted == ALL:
        return None
    if wanted == AUTO:
        if len(allowed) <= 1:
            return None  # already on one CPU (e.g. a batch system's cpuset)
        return current if current in allowed else min(allowed)
    if not wanted.isdigit():
        raise UsageError(f"invalid --cpu {requested!r}: give a CPU number, 'auto' or 'all'")
    cpu = int(wanted)
    if cpu not in allowed:
        raise UsageError(f"CPU {cpu} is not available to this job (it may use {format_cpus(allowed)}); pick one of those")
    return cpu


def format_cpus(cpus: Set[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"

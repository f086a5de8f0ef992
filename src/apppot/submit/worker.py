"""What the submit host can know of the worker that will run a job: its limits, checked at submit.

A batch job's `apppot start` gives the guest at most what the worker's vm.max_map_count lets UML map,
and refuses --mem above the worker's memory (apppot.spec.choose_mem). In general the submit host
cannot see the worker, and `apppot status` reports such a failure from the job's stderr. When every
node of the Slurm cluster is this host (a test cluster such as `apppot testbed`'s), or the ARC CE is,
the worker's limits are this host's, and submit checks them before anything is staged.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from apppot.errors import AppPotError, UsageError
from apppot.say import Say
from apppot.spec import PAGE, choose_mem
from apppot.submit.slurm import conf_path

_LOOPBACK = re.compile(r"(localhost|127(\.\d{1,3}){3}|::1|ip6-localhost)", re.I)


def slurm_nodes(conf_text: str) -> list[str] | None:
    """The addresses of a slurm.conf's nodes (NodeAddr, else NodeHostname, else NodeName); None when
    it names none or one as a host list (n[1-4]) AppPot does not expand, or includes other files."""
    found: list[str] = []
    for raw in conf_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if re.match(r"include\s", line, re.I):
            return None
        if not re.match(r"nodename\s*=", line, re.I):
            continue
        fields = dict((k.lower(), v) for k, _, v in (w.partition("=") for w in line.split()))
        if fields.get("nodename", "").lower() == "default":
            continue
        address = fields.get("nodeaddr") or fields.get("nodehostname") or fields.get("nodename", "")
        for name in address.split(","):
            if not name or "[" in name:
                return None
            found.append(name)
    return found or None


def is_this_host(name: str, here: set[str]) -> bool:
    return bool(_LOOPBACK.fullmatch(name)) or name.lower() in here


def this_host_names() -> set[str]:
    names = {socket.gethostname().lower()}
    names.add(socket.getfqdn().lower())
    return names


def slurm_workers_are_this_host() -> bool:
    """Whether every node of the cluster SLURM_CONF describes is this host (read from the file, not
    asked of slurmctld: a cluster that is down would keep submit waiting)."""
    try:
        text = conf_path().read_text(errors="replace")
    except OSError:
        return False
    nodes = slurm_nodes(text)
    here = this_host_names()
    return nodes is not None and all(is_this_host(n, here) for n in nodes)


def ce_is_this_host(ce: str | None) -> bool:
    """Whether an ARC CE URL names this host (its batch system, then, is most likely this host's too)."""
    if not ce:
        return False
    from urllib.parse import urlsplit

    try:
        host = urlsplit(ce).hostname or ""
    except ValueError:
        return False
    return is_this_host(host, this_host_names())


def check_mem(mem_bytes: int, say: Say) -> None:
    """The guest memory as this host (the worker) would give it: a refusal is an error now, less than
    asked is said now, in the same words `apppot start` would use in the job's stderr."""
    from apppot.backends.uml_instance import read_max_map_count

    try:
        choice = choose_mem(mem_bytes, read_max_map_count(), os.sysconf("SC_PHYS_PAGES") * PAGE)
    except AppPotError as e:
        raise UsageError(f"the job's worker is this host, which would refuse it: {e}") from None
    if choice.warning:
        say(f"the job's worker is this host: {choice.warning}")


# The end of the job's stderr that is read for AppPot's own error line: the line is the last thing
# apppot start writes; the job (hostile, possibly huge) wrote the rest.
_TAIL = 64 * 1024
_LINE_MAX = 400


def reported_error(stage: Path, stderr_name: str) -> str | None:
    """The last `apppot: error:` line in a Slurm job's stderr (next to its staged job directory, as
    the worker's apppot start wrote it), without the prefix and with control characters dropped; None
    if there is none or the file is not a regular file (never followed through a link)."""
    from apppot.submit import results

    try:
        root = os.open(stage, results.DIR_FLAGS)
    except OSError:
        return None
    try:
        fd, st = results.open_regular_file(root, stderr_name)
    except (results.Missing, results.Refusal, OSError):
        return None
    finally:
        os.close(root)
    with os.fdopen(fd, "rb") as f:
        f.seek(max(st.st_size - _TAIL, 0))
        tail = f.read(_TAIL).decode(errors="replace")
    prefix = "apppot: error: "
    lines = [line for line in tail.splitlines() if line.startswith(prefix)]
    if not lines:
        return None
    text = "".join(c for c in lines[-1][len(prefix) :] if c.isprintable())
    return text[:_LINE_MAX] or None

"""The restricted view of the host that the hypervisor runs in (bubblewrap).

UML's hostfs lets guest root mount any host path the UML process can reach, so
the process runs in new user and mount namespaces where only the kernel, its
libraries, the base image, the COW file and the job and control directories exist.
Both UML and QEMU run in a network namespace of their own: code that takes over the
hypervisor reaches neither the host's loopback services nor its abstract Unix sockets
(session buses, X11); the NAT helper on the host (apppot.nat) is the only way out.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError
from apppot.hostcache import cached, file_identity
from apppot.proc import which
from apppot.spec import Isolation

_USERNS_SYSCTLS = (
    "/proc/sys/kernel/unprivileged_userns_clone",
    "/proc/sys/user/max_user_namespaces",
    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
)

BWRAP_ENV = "APPPOT_BWRAP"


class Bind(NamedTuple):
    source: str
    target: str
    writable: bool = False
    fd: int | None = None  # bind this open file (read-only), not whatever ``source`` names when bubblewrap starts


def bwrap_argv(bwrap: str, binds: list[Bind], *, proc: bool = False) -> list[str]:
    """The bubblewrap command line that shows the process only ``binds`` (and /proc if asked), with no network."""
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--cap-drop", "ALL"]
    argv += ["--dev", "/dev", *(["--proc", "/proc"] if proc else []), "--tmpfs", "/tmp"]
    argv += ["--clearenv", "--setenv", "TMPDIR", "/tmp"]
    # slirp refuses to start without HOME.
    argv += ["--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp"]
    seen = set()
    for bind in binds:
        if bind.target not in seen:  # libraries shared by several programs are bound once
            seen.add(bind.target)
            if bind.fd is not None:
                argv += ["--ro-bind-fd", str(bind.fd), bind.target]
            else:
                argv += ["--bind" if bind.writable else "--ro-bind", bind.source, bind.target]
    argv.append("--")
    return argv


def netns_argv(bwrap: str) -> list[str]:
    """The bubblewrap command line that takes only the network away: the process sees the host's files, devices
    (/dev/kvm) and processes as before, and a network namespace with nothing but its own loopback."""
    return [bwrap, "--unshare-net", "--die-with-parent", "--dev-bind", "/", "/", "--"]


def is_setuid(program: str) -> bool:
    """A setuid bwrap clears the personality AppPot sets, so UML then needs /proc to re-execute itself."""
    try:
        return bool(os.stat(program).st_mode & 0o4000)
    except OSError:
        return False


def find_bwrap() -> str | None:
    return os.environ.get(BWRAP_ENV) or which("bwrap")


def probe(bwrap: str | None) -> str | None:
    """None if a sandbox can be made here, else the reason it cannot; cached per bwrap, host kernel and sysctls."""
    if bwrap is None or not os.path.exists(bwrap):
        return "bubblewrap (bwrap) is not installed: sudo apt-get install bubblewrap"
    key = [file_identity(Path(bwrap)), os.uname().release, *map(_read_sysctl, _USERNS_SYSCTLS)]
    return cached("bwrap-probe", key, lambda: {"reason": _probe(bwrap)})["reason"]


def binds_open_files(bwrap: str) -> bool:
    """Whether this bubblewrap binds an open file (--ro-bind-fd, bubblewrap 0.8.0 and later); cached per bwrap."""

    def ask() -> dict[str, bool]:
        try:
            result = subprocess.run([bwrap, "--help"], stdin=subprocess.DEVNULL, capture_output=True, check=False)
        except OSError:
            return {"ro_bind_fd": False}
        return {"ro_bind_fd": b"--ro-bind-fd" in result.stdout + result.stderr}

    return bool(cached("bwrap-bind-fd", [file_identity(Path(bwrap))], ask)["ro_bind_fd"])


def _read_sysctl(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _probe(bwrap: str) -> str | None:
    try:
        result = subprocess.run(
            [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--", "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
    except OSError as e:
        return f"bubblewrap cannot run: {e.strerror}"
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip() or f"status {result.returncode}"
        return f"this host does not allow unprivileged namespaces ({message})"
    return None


_HOSTFS_AND_NET = (
    "the guest from the host",
    "guest root can reach host files through hostfs, and a guest that takes over the hypervisor reaches the host's "
    "abstract sockets and loopback services",
)
_NET_ONLY = (
    "QEMU from the host's network",
    "QEMU shares the host's network namespace (a guest that takes over QEMU reaches the host's abstract sockets and "
    "loopback services)",
)


def require_or_warn(isolation: Isolation, reason: str | None, *, lost: tuple[str, str] = _HOSTFS_AND_NET) -> str | None:
    """Apply the isolation policy: a warning to show, an error, or nothing. ``lost`` names what is isolated
    and what a run without namespaces gives up."""
    if reason is None:
        return None
    what, consequence = lost
    if isolation is Isolation.STRICT:
        raise HostError(f"cannot isolate {what}: {reason}; --isolation strict refuses to run without it")
    return f"warning: reduced isolation, {consequence}: {reason}"


def require_netns_or_warn(isolation: Isolation, reason: str | None) -> str | None:
    """The isolation policy for QEMU, which needs namespaces only to keep off the host's network."""
    return require_or_warn(isolation, reason, lost=_NET_ONLY)

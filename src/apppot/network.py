"""Outbound networking without root: which user-space NAT a kernel can use on this host.

Debian's 6.1 UML has the old eth= drivers with slirp's own transport (`slirp-fullbolt`);
UML 7.x keeps only the vector driver, whose `vde` transport runs vdeplug4's slirp plugin.
Both give the guest 10.0.2.15/24, gateway 10.0.2.2 and DNS 10.0.2.3, with no daemon,
namespace or tun device, and a private NAT per job.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError
from apppot.kernel import KernelTraits

SLIRP = "/usr/bin/slirp-fullbolt"
VDE_PLUG = "/usr/bin/vde_plug"
VDE_PLUGIN_DIR = "/usr/lib/*/vdeplug"
# vde_plug talks to UML over seqpacket:// and to the outside through slirp://.
VDE_PLUGINS = ("libvdeplug_seqpacket.so", "libvdeplug_slirp.so")
MAC = "fe:fd:0a:00:02:0f"
RESOLV_CONF = "/etc/resolv.conf"
# What slirp gives every guest.
GUEST_IP, GATEWAY, NETMASK = "10.0.2.15", "10.0.2.2", "255.255.255.0"


class NetKind(StrEnum):
    SLIRP = "slirp"  # eth0=slirp,... (old drivers)
    VDE_SLIRP = "vde-slirp"  # vec0:transport=vde,vnl=slirp:// (vector driver)


class Network(NamedTuple):
    kind: NetKind
    helper: Path  # the program UML runs
    plugins: tuple[Path, ...] = ()  # libraries the helper loads at run time

    def sandbox_files(self, libraries: Callable[[Path], list[Path]]) -> list[tuple[Path, Path]]:
        """(host path, sandbox path) of everything the helper needs: itself, its plugins, their libraries."""
        files = [(self.helper, self.helper)]
        # The NAT forwards DNS to the host's resolver.
        if os.path.exists(RESOLV_CONF):
            files.append((Path(RESOLV_CONF).resolve(), Path(RESOLV_CONF)))
        helper_libs = libraries(self.helper)
        files += [(lib, lib) for lib in helper_libs]
        # libvdeplug looks for plugins in vdeplug/ next to where the loader found it.
        libvdeplug = next((lib for lib in helper_libs if lib.name.startswith("libvdeplug.so")), None)
        for plugin in self.plugins:
            if libvdeplug is not None:
                files.append((plugin, libvdeplug.parent / "vdeplug" / plugin.name))
            files += [(lib, lib) for lib in libraries(plugin)]
        # glibc loads libgcc_s at run time (thread cancellation in slirp's threads).
        if self.plugins and (libgcc := _libgcc_next_to(helper_libs)) is not None:
            files.append((libgcc, libgcc))
        return files

    @property
    def interface(self) -> str:
        return "eth0" if self.kind is NetKind.SLIRP else "vec0"

    def uml_param(self) -> str:
        if self.kind is NetKind.SLIRP:
            return f"eth0=slirp,{MAC},{self.helper}"
        return f"vec0:transport=vde,vnl=slirp://,mac={MAC}"

    def kernel_ip_param(self) -> str:
        """The kernel's own static configuration of the interface (CONFIG_IP_PNP); it also brings up lo."""
        return f"ip={GUEST_IP}::{GATEWAY}:{NETMASK}::{self.interface}:off"


def _libgcc_next_to(libs: list[Path]) -> Path | None:
    for lib in libs:
        if lib.name.startswith("libc.so"):
            candidate = lib.parent / "libgcc_s.so.1"
            return candidate if candidate.exists() else None
    return None


def _executable(path: str) -> Path | None:
    return Path(path).resolve() if os.access(path, os.X_OK) else None


def choose_network(traits: KernelTraits, wanted: bool | None) -> Network | None:
    """The network for a job: None with --no-net, or when it is only a default and nothing fits."""
    if wanted is False:
        return None
    if traits.eth_drivers and (slirp := _executable(SLIRP)):
        return Network(NetKind.SLIRP, slirp)
    if traits.vector_driver:
        plug = _executable(VDE_PLUG)
        for plugin_dir in sorted(glob.glob(VDE_PLUGIN_DIR)):
            plugins = [Path(plugin_dir, name) for name in VDE_PLUGINS]
            if plug and all(p.exists() for p in plugins):
                return Network(NetKind.VDE_SLIRP, plug, tuple(p.resolve() for p in plugins))
        if wanted:
            raise HostError(
                "--net on this kernel needs vdeplug4's slirp plugin: sudo apt-get install vdeplug libvdeplug-slirp, "
                "or use --no-net"
            )
        return None
    if wanted:
        raise HostError("--net needs slirp, which is not installed: sudo apt-get install slirp, or use --no-net")
    return None

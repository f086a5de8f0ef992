"""Outbound networking without root: a user-space NAT outside the hypervisor's network namespace.

The hypervisor (UML or QEMU) runs in a network namespace of its own, which has no way out. The NAT is
vdeplug4's slirp plugin in a helper on the host, `vde_plug switch://DIR slirp://...`: a private switch
whose only other port is slirp. The hypervisor joins the switch through its socket in DIR (a path in
the file system, which crosses namespaces): Debian's 6.1 UML with `eth0=vde,DIR`, UML 7.x with the
vector driver's `vde` transport, QEMU with `-netdev vde`. UML's libvdeplug is vdeplug4's static
stub, which runs `vde_plug` itself (over seqpacket://) inside UML's sandbox. A vde client tells the
switch the path of its own socket in DIR, so DIR has the same path inside the sandbox as outside.
The guest gets 10.0.2.15/24, gateway 10.0.2.2 and DNS 10.0.2.3 (forwarded to the host's resolver).
slirp maps 10.0.2.2 to the host's loopback: that is closed (libslirp's disable_host_loopback) unless
the job asks for it with --host-loopback.
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

VDE_PLUG = "/usr/bin/vde_plug"
VDE_PLUGIN_DIR = "/usr/lib/*/vdeplug"
# The helper makes the switch and runs slirp; UML's vde_plug joins the switch through vde://.
HELPER_PLUGINS = ("libvdeplug_switch.so", "libvdeplug_slirp.so")
GUEST_PLUGINS = ("libvdeplug_seqpacket.so", "libvdeplug_vde.so")
PACKAGES = "vdeplug libvdeplug-slirp"
MAC = "fe:fd:0a:00:02:0f"
# What slirp gives every guest.
GUEST_IP, GATEWAY, NETMASK = "10.0.2.15", "10.0.2.2", "255.255.255.0"
# The switch's URL syntax reserves '[' (port, options); UML's eth0= and QEMU's options reserve ','.
_RESERVED = set("[],")


class NetKind(StrEnum):
    """How the hypervisor joins the helper's switch."""

    ETH_VDE = "eth-vde"  # eth0=vde,DIR (UML's old drivers: Debian's 6.1)
    VECTOR_VDE = "vector-vde"  # vec0:transport=vde,vnl=vde://DIR (UML 7.x)
    QEMU_VDE = "qemu-vde"  # -netdev vde,sock=DIR


class Network(NamedTuple):
    kind: NetKind
    plug: Path  # vde_plug, the helper on the host
    plugin_dir: Path  # vdeplug4's plugins
    host_loopback: bool = False  # slirp's 10.0.2.2 reaches the host's 127.0.0.1

    def helper_argv(self, switch: str) -> list[str]:
        """The NAT helper: a switch at `switch` (a directory it makes) with slirp on its other port."""
        check_switch_path(switch)
        return [str(self.plug), f"switch://{switch}", slirp_url(self.host_loopback)]

    def sandbox_files(self, libraries: Callable[[Path], list[Path]]) -> list[tuple[Path, Path]]:
        """(host path, sandbox path) of what UML needs to join the switch: vde_plug, its plugins, their libraries."""
        files = [(self.plug, self.plug)]
        plug_libs = libraries(self.plug)
        files += [(lib, lib) for lib in plug_libs]
        # libvdeplug looks for plugins in vdeplug/ next to where the loader found it.
        libvdeplug = next((lib for lib in plug_libs if lib.name.startswith("libvdeplug.so")), None)
        for plugin in (self.plugin_dir / name for name in GUEST_PLUGINS):
            if libvdeplug is not None:
                files.append((plugin, libvdeplug.parent / "vdeplug" / plugin.name))
            files += [(lib, lib) for lib in libraries(plugin)]
        return files

    @property
    def interface(self) -> str:
        return "vec0" if self.kind is NetKind.VECTOR_VDE else "eth0"

    def uml_param(self, switch: str) -> str:
        check_switch_path(switch)
        if self.kind is NetKind.ETH_VDE:
            return f"eth0=vde,{switch},{MAC}"
        return f"vec0:transport=vde,vnl=vde://{switch},mac={MAC}"

    def qemu_netdev(self, switch: str) -> str:
        check_switch_path(switch)
        return f"vde,id=net0,sock={switch}"

    def kernel_ip_param(self) -> str:
        """The kernel's own static configuration of the interface (CONFIG_IP_PNP); it also brings up lo."""
        return f"ip={GUEST_IP}::{GATEWAY}:{NETMASK}::{self.interface}:off"


def slirp_url(host_loopback: bool) -> str:
    return "slirp://" if host_loopback else "slirp:///disable_host_loopback"


def check_switch_path(path: str) -> None:
    if _RESERVED & set(path) or any(c.isspace() for c in path):
        raise HostError(f"the network switch path {path} has blanks, commas or brackets; set TMPDIR to a plainer directory")


def _executable(path: str) -> Path | None:
    return Path(path).resolve() if os.access(path, os.X_OK) else None


def _plugin_dir(names: tuple[str, ...]) -> Path | None:
    for plugin_dir in sorted(glob.glob(VDE_PLUGIN_DIR)):
        if all(Path(plugin_dir, name).exists() for name in names):
            return Path(plugin_dir)
    return None


def _vde_network(kind: NetKind, wanted: bool | None, host_loopback: bool) -> Network | None:
    plug = _executable(VDE_PLUG)
    plugin_dir = _plugin_dir(HELPER_PLUGINS + GUEST_PLUGINS)
    if plug is not None and plugin_dir is not None:
        return Network(kind, plug, plugin_dir, host_loopback)
    if wanted:
        raise HostError(f"--net needs vdeplug4's slirp plugin: sudo apt-get install {PACKAGES}, or use --no-net")
    return None


def choose_network(traits: KernelTraits, wanted: bool | None, host_loopback: bool = False) -> Network | None:
    """The network for a UML job: None with --no-net, or when it is only a default and nothing fits."""
    if wanted is False:
        return None
    if traits.eth_drivers:
        return _vde_network(NetKind.ETH_VDE, wanted, host_loopback)
    if traits.vector_driver:
        return _vde_network(NetKind.VECTOR_VDE, wanted, host_loopback)
    if wanted:
        raise HostError("--net needs a UML kernel with the vde or vector network driver; use --no-net or another --kernel")
    return None


def choose_qemu_network(wanted: bool | None, host_loopback: bool = False) -> Network | None:
    """The network for a QEMU job: QEMU's own user-mode NAT cannot close the host's loopback, so the same helper."""
    if wanted is False:
        return None
    return _vde_network(NetKind.QEMU_VDE, wanted, host_loopback)

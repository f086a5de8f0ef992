"""Golden tests of the pure command-line builders: UML and bubblewrap."""

from __future__ import annotations

from pathlib import Path

import pytest

from apppot.backends.uml import UmlLaunch, cmdline_length, personality_prefix, uml_argv
from apppot.errors import HostError
from apppot.kernel import KernelTraits
from apppot.network import NetKind, Network
from apppot.sandbox import Bind, bwrap_argv, netns_argv

LAUNCH = UmlLaunch(
    kernel="/apppot/linux",
    base="/apppot/base/1234.img",
    cow="/apppot/cow",
    mem_bytes=256 * 1024 * 1024,
    umid="job-1",
    uml_dir="/apppot/uml",
    log_fd=3,
    stdout_fd=5,
    stderr_fd=7,
)


def test_uml_argv_for_a_batch_job() -> None:
    assert uml_argv(LAUNCH, ["apppot.v=1"]) == [
        "/apppot/linux",
        "ubd0=/apppot/cow,/apppot/base/1234.img",
        "root=/dev/ubda",
        "rw",
        "mem=256M",
        "init=/usr/sbin/apppot-init",
        "quiet",
        "umid=job-1",
        "uml_dir=/apppot/uml",
        "con=null",
        "ssl=null",
        "con0=null,fd:3",
        "ssl0=null,fd:5",
        "ssl1=null,fd:7",
        "apppot.v=1",
    ]


PLUG, PLUGINS = Path("/usr/bin/vde_plug"), Path("/usr/lib/x/vdeplug")


def test_uml_argv_with_terminal_network_tuning_and_extras() -> None:
    net = Network(NetKind.ETH_VDE, PLUG, PLUGINS)
    launch = LAUNCH._replace(
        terminal_fds=(8, 9),
        net_params=(net.uml_param("/apppot/net"),),
        kernel_params=("seccomp=on", "lpj=34000000"),
        extra=("loglevel=7",),
    )
    argv = uml_argv(launch, ["apppot.v=1"])
    assert argv[-6:] == [
        "con1=fd:8,fd:9",
        "eth0=vde,/apppot/net,fe:fd:0a:00:02:0f",
        "seccomp=on",
        "lpj=34000000",
        "loglevel=7",
        "apppot.v=1",
    ]


def test_network_parameters_per_driver() -> None:
    vector = Network(NetKind.VECTOR_VDE, PLUG, PLUGINS)
    assert vector.uml_param("/apppot/net") == "vec0:transport=vde,vnl=vde:///apppot/net,mac=fe:fd:0a:00:02:0f"
    assert vector.interface == "vec0"
    assert vector.kernel_ip_param() == "ip=10.0.2.15::10.0.2.2:255.255.255.0::vec0:off"
    assert Network(NetKind.ETH_VDE, PLUG, PLUGINS).interface == "eth0"
    assert Network(NetKind.QEMU_VDE, PLUG, PLUGINS).qemu_netdev("/run/j/net") == "vde,id=net0,sock=/run/j/net"


def test_the_nat_helper_closes_the_host_loopback_unless_asked() -> None:
    closed = Network(NetKind.VECTOR_VDE, PLUG, PLUGINS)
    assert closed.helper_argv("/run/j/net") == ["/usr/bin/vde_plug", "switch:///run/j/net", "slirp:///disable_host_loopback"]
    assert closed._replace(host_loopback=True).helper_argv("/run/j/net")[2] == "slirp://"


@pytest.mark.parametrize("path", ["/tmp/a b/net", "/tmp/a,b/net", "/tmp/a[1]/net", "/tmp/a\tb/net"])
def test_a_switch_path_the_urls_cannot_carry_is_refused(path: str) -> None:
    net = Network(NetKind.VECTOR_VDE, PLUG, PLUGINS)
    for build in (net.helper_argv, net.uml_param, net.qemu_netdev):
        with pytest.raises(HostError, match="set TMPDIR"):
            build(path)


def test_uml_gets_vde_plug_and_its_plugins_in_the_sandbox() -> None:
    libs = {
        PLUG: [Path("/lib/x/libvdeplug.so.2"), Path("/lib/x/libc.so.6")],
        PLUGINS / "libvdeplug_seqpacket.so": [Path("/lib/x/libc.so.6")],
        PLUGINS / "libvdeplug_vde.so": [Path("/lib/x/libvdeplug_mod.so.2")],
    }
    assert Network(NetKind.VECTOR_VDE, PLUG, PLUGINS).sandbox_files(lambda p: libs[p]) == [
        (PLUG, PLUG),
        (Path("/lib/x/libvdeplug.so.2"), Path("/lib/x/libvdeplug.so.2")),
        (Path("/lib/x/libc.so.6"), Path("/lib/x/libc.so.6")),
        (PLUGINS / "libvdeplug_seqpacket.so", Path("/lib/x/vdeplug/libvdeplug_seqpacket.so")),
        (Path("/lib/x/libc.so.6"), Path("/lib/x/libc.so.6")),
        (PLUGINS / "libvdeplug_vde.so", Path("/lib/x/vdeplug/libvdeplug_vde.so")),
        (Path("/lib/x/libvdeplug_mod.so.2"), Path("/lib/x/libvdeplug_mod.so.2")),
    ]


def test_kernel_boot_params_follow_the_traits() -> None:
    fast = KernelTraits(
        seccomp_option=True, seccomp_works=True, eth_drivers=False, vector_driver=True, ip_autoconfig=True, lpj=123
    )
    assert fast.boot_params() == ["seccomp=on", "lpj=123"]
    refused = KernelTraits(
        seccomp_option=True, seccomp_works=False, eth_drivers=False, vector_driver=True, ip_autoconfig=False, lpj=None
    )
    assert refused.boot_params() == []


def test_cmdline_length_counts_what_uml_appends() -> None:
    assert cmdline_length(["/k", "a=1", "b"]) == len("a=1 b console=tty0")


def test_bwrap_argv_shows_only_the_binds() -> None:
    binds = [Bind("/usr/bin/linux.uml", "/apppot/linux"), Bind("/home/u/job", "/apppot/job", writable=True)]
    assert bwrap_argv("/usr/bin/bwrap", binds) == [
        "/usr/bin/bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--cap-drop",
        "ALL",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--clearenv",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/tmp",
        "--ro-bind",
        "/usr/bin/linux.uml",
        "/apppot/linux",
        "--bind",
        "/home/u/job",
        "/apppot/job",
        "--",
    ]


def test_bwrap_argv_shows_proc_only_when_asked() -> None:
    assert "--proc" not in bwrap_argv("bwrap", [])
    assert bwrap_argv("bwrap", [], proc=True)[7:9] == ["--proc", "/proc"]


def test_uml_starts_without_address_randomisation() -> None:
    assert personality_prefix("/usr/bin/setarch") == ["/usr/bin/setarch", "--addr-no-randomize"]
    assert personality_prefix(None) == []


def test_bwrap_argv_binds_a_shared_library_once() -> None:
    binds = [Bind("/lib/libc.so.6", "/lib/libc.so.6"), Bind("/lib/libc.so.6", "/lib/libc.so.6")]
    assert bwrap_argv("bwrap", binds).count("/lib/libc.so.6") == 2


def test_the_sandbox_never_shares_the_hosts_network() -> None:
    argv = bwrap_argv("bwrap", [Bind("/a", "/b")], proc=True)
    assert "--unshare-all" in argv and "--share-net" not in argv


def test_qemu_runs_in_a_network_namespace_with_the_hosts_files() -> None:
    assert netns_argv("/usr/bin/bwrap") == ["/usr/bin/bwrap", "--unshare-net", "--die-with-parent", "--dev-bind", "/", "/", "--"]


def test_uml_argv_for_a_full_boot_starts_systemd() -> None:
    argv = uml_argv(LAUNCH._replace(full_boot=True), [])
    assert "init=/usr/lib/systemd/systemd" in argv
    assert not any(a.startswith("init=/usr/sbin/apppot-init") for a in argv)

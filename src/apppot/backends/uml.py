"""The User-mode Linux command line for one job (pure: no I/O)."""

from __future__ import annotations

from typing import NamedTuple

AGENT_PATH = "/usr/sbin/apppot-init"
SYSTEMD_PATH = "/usr/lib/systemd/systemd"  # --full-boot: the distribution's init, which starts the agent
AGENT_SERVICE = "/etc/systemd/system/apppot-agent.service"
MIB = 1024 * 1024


class UmlLaunch(NamedTuple):
    """Everything the UML command line is made of, as seen by the UML process."""

    kernel: str
    base: str  # "": no COW, the image itself is `cow` and opened read-write
    cow: str
    mem_bytes: int
    umid: str
    uml_dir: str
    log_fd: int
    stdout_fd: int
    stderr_fd: int
    terminal_fds: tuple[int, int] | None = None  # (input, output) of an interactive session
    net_params: tuple[str, ...] = ()  # the network device (e.g. eth0=slirp,...) and its configuration
    kernel_params: tuple[str, ...] = ()  # what this kernel wants on this host: seccomp=, lpj=
    extra: tuple[str, ...] = ()
    full_boot: bool = False  # boot systemd, which runs the agent as its last service


def uml_argv(launch: UmlLaunch, guest_params: list[str]) -> list[str]:
    """The UML kernel's argv: disks, memory, channels, then the agent's parameters."""
    argv = [
        launch.kernel,
        f"ubd0={launch.cow},{launch.base}" if launch.base else f"ubd0={launch.cow}",
        "root=/dev/ubda",
        "rw",
        f"mem={launch.mem_bytes // MIB}M",
        f"init={SYSTEMD_PATH if launch.full_boot else AGENT_PATH}",
        "quiet",
        f"umid={launch.umid}",
        f"uml_dir={launch.uml_dir}",
        # Boot chatter goes to the log; the job's stdout and stderr each get
        # their own serial line, so nothing mixes with the job's output.
        "con=null",
        "ssl=null",
        f"con0=null,fd:{launch.log_fd}",
        f"ssl0=null,fd:{launch.stdout_fd}",
        f"ssl1=null,fd:{launch.stderr_fd}",
    ]
    if launch.terminal_fds is not None:
        tin, tout = launch.terminal_fds
        argv.append(f"con1=fd:{tin},fd:{tout}")
    argv += list(launch.net_params)
    argv += list(launch.kernel_params)
    argv += list(launch.extra)
    argv += guest_params
    return argv


def personality_prefix(setarch: str | None) -> list[str]:
    """UML re-executes itself unless address randomisation is already off: start it that way.

    This saves an exec and lets the sandbox leave out /proc (UML finds itself through /proc/self/exe)."""
    return [setarch, "--addr-no-randomize"] if setarch else []


def cmdline_length(argv: list[str]) -> int:
    """Length of the kernel command line UML makes of argv (it appends console=tty0)."""
    return len(" ".join(argv[1:])) + len(" console=tty0")

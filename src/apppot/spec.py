"""What the user asked for: typed, frozen, no I/O."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError, UsageError

MIB = 1024 * 1024
PAGE = 4096
# The guest kernel keeps some memory for itself; the rest may end up in one
# guest process, which UML maps page by page in the worst case.
GUEST_KERNEL_RESERVE = 16 * MIB
DEFAULT_MEM = 512 * MIB
FALLBACK_MEM = 256 * MIB
MIN_MEM = 64 * MIB  # below this, no guest worth starting
# How long a guest may take to start AppPot's agent: generous, for systemd (--full-boot) under QEMU's
# emulation on a loaded host; a guest that never starts it (init=/bin/sh) ends with 122 then.
DEFAULT_BOOT_TIMEOUT_S = 120.0

_SIZE = re.compile(r"(\d+)([KMGkmg]?)[iI]?[bB]?")


class Isolation(StrEnum):
    """How strictly the host is hidden from the guest."""

    AUTO = "auto"  # a sandbox where the host allows it, else a warning
    STRICT = "strict"  # a sandbox, or refuse to run


class JobSpec(NamedTuple):
    """One `apppot start` request."""

    argv: tuple[str, ...] | None
    jobdir: Path
    unsafe_jobdir: bool = False  # accept /, a system directory or the whole home as the job directory
    image: Path | None = None  # None: the tiny default appliance
    cow: Path | None = None  # None: a private temporary COW
    mem_bytes: int | None = None  # None: DEFAULT_MEM where the host allows it
    net: bool | None = None  # None: on when the NAT helper (vdeplug4's slirp plugin) is installed
    host_loopback: bool = False  # the guest reaches the host's 127.0.0.1 as 10.0.2.2 (--host-loopback)
    kernel: str | None = None
    instance_id: str | None = None
    extra: tuple[str, ...] = ()
    user: str | None = None
    group: str | None = None
    isolation: Isolation = Isolation.AUTO
    verbose: bool = False
    console_log: Path | None = None
    changes: Path | None = None  # a changes archive to merge at boot (else apppot-changes.tar.gz in the job dir)
    writable_image: bool = False  # no COW: the job writes the image itself (on purpose)
    full_boot: bool = False  # boot the image's systemd; the agent runs as its last service
    cpu: str | None = None  # None: auto (see apppot.cpu)
    backend: str | None = None  # uml, qemu or auto; None: $APPPOT_BACKEND, the config file, else uml
    kvm: bool | None = None  # QEMU: True requires KVM, False asks for TCG, None uses KVM where it works
    no_stdin: bool = False  # -n: the job's stdin is /dev/null; the host's stdin is never read
    boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S  # until the agent announces itself in the report directory
    verify: bool = False  # check every image's content id against its record (names and sha256: always are)
    record: Path | None = None  # write the job's provenance record here when it ends (apppot.record)


def parse_mem(text: str) -> int:
    """'512M', '2G', '65536K' -> bytes; a plain number means MiB."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"invalid memory size {text!r}: write it like 512M or 2G")
    value = int(m.group(1))
    unit = m.group(2).upper() or "M"
    size = value * {"K": 1024, "M": MIB, "G": 1024 * MIB}[unit]
    if size < 32 * MIB:
        raise UsageError(f"memory size {text} is too small: a guest needs at least 32M")
    return size


def parse_seconds(text: str, option: str) -> float:
    """'120' or '2.5' -> seconds, more than 0 and finite."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:  # also refuses nan and inf
        raise UsageError(f"{option} {text!r} is not a number of seconds: give one like 120 or 2.5")
    return value


def map_count_needed(mem_bytes: int) -> int:
    """vm.max_map_count a guest of this size may need: one host mapping per page of a process."""
    return max(mem_bytes - GUEST_KERNEL_RESERVE, 0) // PAGE


def mem_for_map_count(max_map_count: int) -> int:
    """The most guest memory (whole MiB) a vm.max_map_count covers in the worst case: map_count_needed's inverse."""
    return (max_map_count * PAGE + GUEST_KERNEL_RESERVE) // MIB * MIB


class MemChoice(NamedTuple):
    bytes: int
    warning: str | None = None  # said before the boot: the host may not map all of it


def choose_mem(requested: int | None, max_map_count: int, host_bytes: int) -> MemChoice:
    """The guest memory: as requested, up to the host's and to what vm.max_map_count lets UML map.

    UML may map each page of a guest process separately (a process filling fragmented memory).
    Measured: a process that needs more mappings than vm.max_map_count allows does not fail an
    allocation, it spins for ever (UML retries the fault). So a guest never gets more than the host
    can map for it: less than asked is said in one warning line, with the sysctl that gives it all."""
    fitting = mem_for_map_count(max_map_count)
    if requested is None:
        if map_count_needed(DEFAULT_MEM) <= max_map_count:
            return MemChoice(DEFAULT_MEM)
        if fitting < MIN_MEM:
            raise _no_useful_memory(max_map_count, DEFAULT_MEM, "the default 512M")
        return MemChoice(min(FALLBACK_MEM, fitting))  # never more than UML can map: a guest mapping more would hang
    if requested > host_bytes:
        raise HostError(f"--mem {requested // MIB}M is more than this host's memory ({host_bytes // MIB}M): ask for less memory")
    needed = map_count_needed(requested)
    if needed <= max_map_count:
        return MemChoice(requested)
    if fitting < MIN_MEM:
        raise _no_useful_memory(max_map_count, requested, f"--mem {requested // MIB}M")
    fix = f"'sudo sysctl -w vm.max_map_count={needed}'"
    return MemChoice(
        fitting,
        f"--mem {requested // MIB}M: the guest gets {fitting // MIB}M, what vm.max_map_count ({max_map_count}) lets UML map "
        f"in the worst case (a guest process mapping more would hang); {fix} gives it all",
    )


def _no_useful_memory(max_map_count: int, mem: int, what: str) -> HostError:
    fitting = mem_for_map_count(max_map_count) // MIB
    return HostError(
        f"vm.max_map_count is {max_map_count}: UML could map no useful guest memory ({fitting}M, less than "
        f"{MIN_MEM // MIB}M); 'sudo sysctl -w vm.max_map_count={map_count_needed(mem)}' allows {what}"
    )

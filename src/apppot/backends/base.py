"""What a backend instance offers the runner: one guest on one hypervisor.

The runner knows only this interface. Each backend (UML in uml_instance.py, QEMU in
qemu_instance.py) owns its own prepared state (kernel, accelerator, sandbox), the file
the guest writes (UML's COW, QEMU's overlay or snapshot), its command line and what
its process inherits. Several instances under one runner is how a job with several
guests will be built.
"""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple

from apppot.diskspace import DiskWatch
from apppot.network import Network
from apppot.spec import JobSpec
from apppot.streams import Streams


class Prepared(NamedTuple):
    """What every backend is given: the checked inputs of a job, resolved against this host."""

    image: Path
    fs_uuid: str
    jobdir: Path
    mem_bytes: int
    net: Network | None  # the NAT helper the guest's network goes through
    umid: str  # UML's umid, QEMU's -name
    cpu: int | None = None  # the host CPU the guest is pinned to
    changes: Path | None = None  # a changes archive to merge at boot (checked as it is copied, before the boot)
    warnings: tuple[str, ...] = ()  # said before every boot: what the job gets differs from what was asked
    notices: tuple[str, ...] = ()  # host conditions no job changes: said once to a terminal (apppot.notices), or under -v
    image_fd: int | None = None  # the image, opened when its content id was checked: the file the guest boots


class RunPaths(NamedTuple):
    """Where one run keeps its files on the host."""

    ctl: Path  # the control directory (host -> guest)
    out: Path  # the report directory (guest -> host)
    own: Path  # an empty directory for the hypervisor's own files (UML's uml_dir)
    disk: Path  # the COW or overlay the guest writes
    switch: Path  # the NAT helper's switch


class GuestFds(NamedTuple):
    """The descriptors the hypervisor inherits."""

    log: int
    stdout: int
    stderr: int
    terminal: tuple[int, int] | None  # (stdin, stdout) of an interactive session


class GuestDisk(NamedTuple):
    """The file the guest's disk writes go to, as the runner holds it while the job runs."""

    path: Path  # what the hypervisor opens
    watch: DiskWatch  # its filesystem's room, checked before the boot and after the job
    lock_fd: int | None = None  # the user's --cow, locked (flock) until the guest is stopped


class GuestNetwork(NamedTuple):
    """What the agent is told about the guest's network."""

    interface: str | None  # None: no network
    configured: bool  # the kernel configured it already (ip= on UML's command line)


class Instance(ABC):
    """One guest of a job: the runner starts ``command``, relays its streams and stops its process group."""

    name: str  # for messages: "UML", "QEMU"

    def __init__(self, spec: JobSpec, prepared: Prepared) -> None:
        self.spec = spec
        self.prepared = prepared

    @abstractmethod
    def disk(self, rundir: Path) -> GuestDisk:
        """The file the guest's disk writes go to, checked for room, made now if needed and, when it is the
        user's --cow, locked, so that of several jobs started on one COW exactly one runs. ``rundir`` is
        this job's run directory, a throw-away place in TMPDIR."""

    @abstractmethod
    def command(self, paths: RunPaths, fds: GuestFds, streams: Streams) -> list[str]:
        """The hypervisor's argv (pure but for facts looked up on the host)."""

    @abstractmethod
    def network(self) -> GuestNetwork:
        """The network as the agent sees it."""

    def stdio(self, fds: GuestFds) -> tuple[int, int]:
        """The hypervisor process's own stdin and stdout."""
        return subprocess.DEVNULL, fds.log

    def inherited_fds(self) -> list[int]:
        """Descriptors of the job's files the hypervisor's command line names (the checked image, bound by bubblewrap)."""
        return []

    def check_image_unchanged(self) -> None:
        """Refuse, just before the hypervisor opens the image by its name, when that name no longer gives the
        file whose content id was checked. An image bound by its descriptor is not opened by name: a name
        replaced meanwhile (publish --force) changes nothing there."""
        fd = self.prepared.image_fd
        if fd is not None and fd not in self.inherited_fds():
            from apppot.images.verify import check_still_named

            check_still_named(fd, self.prepared.image)

    # The agent tells when the guest's terminal can take keys: until then the host holds them (apppot.typeahead).
    holds_typed_keys = False

    @property
    def needs_death_signal(self) -> bool:
        """True when nothing else (bubblewrap's --die-with-parent) ends the hypervisor if AppPot dies."""
        return True

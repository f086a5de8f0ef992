"""Everything about a job that can be checked before it boots, resolved against this host.

`prepare` turns a JobSpec into a Prepared: the kernel or QEMU, the image, the job
directory (checked by apppot.jobdir), memory, network, sandbox and CPU. Nothing
here starts the guest; a refusal is one AppPotError.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from apppot import cow, cpu, userpath
from apppot.backends.choice import Backend, Decision, KvmState, decide, requested
from apppot.backends.qemu import QEMU_IMG, QEMU_IMG_PACKAGE, QEMU_PACKAGE, QEMU_SYSTEM, Accel
from apppot.backends.uml import AGENT_SERVICE, SYSTEMD_PATH
from apppot.errors import CowError, HostError, UsageError
from apppot.images import ext4, tiny
from apppot.images.store import cache_dir, resolve_image
from apppot.jobdir import check_jobdir, check_not_in_cache, check_outside
from apppot.kernel import FoundKernel, KernelTraits, find_kernel, kernel_traits
from apppot.network import Network, choose_network, choose_qemu_network
from apppot.proc import run, which
from apppot.sandbox import find_bwrap, probe, require_netns_or_warn, require_or_warn
from apppot.spec import DEFAULT_MEM, PAGE, JobSpec, choose_mem

AUTO_CHANGES = "apppot-changes.tar.gz"  # merged at boot when found in the job directory
_UMID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HOSTFS_SAFE = re.compile(r"/[^\s,\"]*")

Say = Callable[[str], None]


def say_stderr(message: str) -> None:
    sys.stderr.write(f"apppot: {message}\n")
    sys.stderr.flush()


class QemuSetup(NamedTuple):
    """What a QEMU job runs: QEMU, the guest kernel and its initramfs, the accelerator."""

    qemu: str
    kernel: Path  # what QEMU boots directly (guest_kernel.direct_kernel)
    initrd: Path
    accel: Accel


class Prepared(NamedTuple):
    """The checked inputs of a job, resolved against this host."""

    kernel: FoundKernel | None  # UML's; None under QEMU
    traits: KernelTraits | None
    image: Path
    fs_uuid: str
    jobdir: Path
    mem_bytes: int
    net: Network | None  # the NAT helper the guest's network goes through
    bwrap: str | None
    umid: str
    cpu: int | None = None  # the host CPU the guest is pinned to
    changes: Path | None = None  # a changes archive to merge at boot (checked as it is copied, before the boot)
    warnings: tuple[str, ...] = ()
    qemu: QemuSetup | None = None  # set when the job runs under QEMU


def _read_max_map_count() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530


def default_image(say: Say) -> Path:
    target = tiny.image_path()
    if not target.exists():
        say(f"building the default appliance (first use) into {target} ...")
        tiny.build()
    return target


def choose_backend(spec: JobSpec, say: Say) -> Decision:
    """--backend, $APPPOT_BACKEND, the config file, else UML; KVM probed where it matters."""
    backend, where = requested(spec.backend, os.environ)
    decision = decide(backend, where, spec.kvm, lambda: kvm_state(say))
    if spec.verbose:
        say(f"backend: {decision.why}")
    return decision


def kvm_state(say: Say) -> KvmState:
    from apppot import kvm

    return kvm.state(say)


def _qemu_setup(accel: Accel, say: Say) -> QemuSetup:
    from apppot import guest_kernel

    qemu = which(QEMU_SYSTEM)
    if qemu is None:
        raise HostError(f"{QEMU_SYSTEM} is not installed: sudo apt-get install {QEMU_PACKAGE}")
    kernel = guest_kernel.find(say)
    return QemuSetup(qemu, guest_kernel.direct_kernel(kernel), guest_kernel.initramfs(kernel), accel)


def prepare(spec: JobSpec, say: Say, decision: Decision | None = None) -> Prepared:
    """Check everything about the job that can be checked before booting."""
    jobdir = check_jobdir(spec.jobdir, spec.unsafe_jobdir)
    check_outside(jobdir, run_base(), "the directory for AppPot's run files (TMPDIR)", "set TMPDIR elsewhere")
    _keep_cache_outside(jobdir, say if spec.verbose else None)
    check_outside(jobdir, cache_dir(), "AppPot's cache", "set XDG_CACHE_HOME to a place outside it, or use another --jobdir")
    check_not_in_cache(jobdir, cache_dir())
    image = resolve_image(str(spec.image)) if spec.image is not None else default_image(say)
    fs_uuid = ext4.filesystem_uuid(image)  # also says when the image is missing or unreadable
    decision = decision or choose_backend(spec, say)
    if decision.backend is Backend.QEMU:
        return _prepare_qemu(spec, say, decision, jobdir, image, fs_uuid)
    kernel = find_kernel(spec.kernel)
    check_outside(jobdir, kernel.path, "the kernel", "keep kernels outside the job directory")
    traits = kernel_traits(kernel.path, say if spec.verbose else None)
    if spec.verbose:
        mode = "seccomp" if traits.seccomp_works else "ptrace"
        why = "" if traits.seccomp_works else (" (seccomp mode refused by this host)" if traits.seccomp_option else "")
        say(f"kernel: {kernel.path} (chosen by {kernel.source.value}), {mode} mode{why}")
    mem, mem_warning = choose_mem(spec.mem_bytes, _read_max_map_count(), os.sysconf("SC_PHYS_PAGES") * PAGE)
    net = choose_network(traits, spec.net, spec.host_loopback)
    umid = _instance_id(spec)
    bwrap = find_bwrap()
    warning = require_or_warn(spec.isolation, probe(bwrap))
    warnings = tuple(w for w in (mem_warning, warning) if w)
    pin = cpu.choose_cpu(spec.cpu, os.sched_getaffinity(0), cpu.current_cpu())
    if spec.verbose:
        say(f"guest pinned to host CPU {pin}" if pin is not None else "guest not pinned to a host CPU")
    changes = spec.changes if spec.changes is not None else _auto_changes(jobdir)
    prepared = Prepared(
        kernel, traits, image, fs_uuid, jobdir, mem, net, None if warning else bwrap, umid, pin, changes, warnings
    )
    if warning:
        for path, what in ((jobdir, "job directory"), (image, "image")):
            if not _HOSTFS_SAFE.fullmatch(str(path)):
                raise UsageError(f"the {what} path {path} has blanks or commas, which AppPot can only pass with namespaces")
    _check_image_use(spec, image, fs_uuid)
    return prepared


def _keep_cache_outside(jobdir: Path, say: Say | None) -> None:
    """Where the cache comes from $HOME and $HOME is (or holds) the job directory, as on ARC, whose jobs get
    their session directory as HOME: this process uses a private cache beside the run directories instead."""
    if os.path.isabs(os.environ.get("XDG_CACHE_HOME", "")) or not cache_dir().resolve().is_relative_to(jobdir):
        return
    private = run_base() / f".apppot-cache-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        private.mkdir(mode=0o700)
    st = private.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise HostError(f"{private} is not a private directory of yours; remove it, or set XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(private)
    if say:
        say(f"$HOME holds the job directory: AppPot's cache for this job is {private / 'apppot'}")


def _prepare_qemu(spec: JobSpec, say: Say, decision: Decision, jobdir: Path, image: Path, fs_uuid: str) -> Prepared:
    assert decision.accel is not None
    setup = _qemu_setup(decision.accel, say)
    umid = _instance_id(spec)
    for path, what in ((jobdir, "job directory"), (image, "image")):
        if "," in str(path):
            raise UsageError(f"the {what} path {path} has a comma, which QEMU cannot take; rename or move it")
    # QEMU's emulation runs on several host threads: it is pinned only when asked for a CPU.
    pin = cpu.choose_cpu(spec.cpu, os.sched_getaffinity(0), cpu.current_cpu()) if spec.cpu not in (None, "auto") else None
    changes = spec.changes if spec.changes is not None else _auto_changes(jobdir)
    bwrap = find_bwrap()
    netns_warning = require_netns_or_warn(spec.isolation, probe(bwrap))
    warnings = tuple(w for w in (decision.warning, netns_warning) if w)
    mem = spec.mem_bytes or DEFAULT_MEM
    net = choose_qemu_network(spec.net, spec.host_loopback)
    bwrap = None if netns_warning else bwrap
    prepared = Prepared(None, None, image, fs_uuid, jobdir, mem, net, bwrap, umid, pin, changes, warnings, setup)
    _check_image_use(spec, image, fs_uuid, qemu=True)
    return prepared


def _instance_id(spec: JobSpec) -> str:
    """--id, checked, or a name made of apppot's pid: UML's umid, QEMU's -name."""
    umid = spec.instance_id or f"apppot-{os.getpid()}"
    if not _UMID.fullmatch(umid):
        raise UsageError(f"invalid --id {umid!r}: use letters, digits, '.', '_' and '-'")
    return umid


def _check_overlay(overlay: Path, image: Path) -> None:
    """A --cow file for QEMU must be a qcow2 overlay of this very image, made or last used since the image
    last changed (qcow2 records no mtime of its base, as UML's COW header does), and not in use."""
    import json

    result = run([QEMU_IMG, "info", "--output=json", str(overlay)], check=False, package=QEMU_IMG_PACKAGE)
    if b"Is another process using the image" in result.stderr:  # the write lock QEMU holds while a job runs
        raise CowError(f"--cow {overlay} is in use by another running job; wait for it, or use another --cow")
    try:
        info = json.loads(result.stdout)
    except ValueError:
        info = {}
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    specific = info.get("format-specific", {}).get("data", {})
    if isinstance(specific, dict) and specific.get("data-file"):  # QEMU would write the guest's sectors there
        raise CowError(f"--cow {overlay} keeps its data in another file ({specific['data-file']}); give a new file name")
    if info.get("format") != "qcow2" or not backing:
        raise CowError(f"--cow {overlay} is not a QEMU overlay (qcow2 with a backing image); give a new file name")
    if Path(backing).resolve() != image.resolve():
        raise CowError(f"--cow {overlay} belongs to the image {backing}, not {image}; use it with that image")
    base = image.stat()
    # The ctime too: a user can put an image's mtime back, not its ctime.
    changed_ns = max(base.st_mtime_ns, base.st_ctime_ns)
    if info.get("virtual-size") != base.st_size or changed_ns > overlay.stat().st_mtime_ns:
        raise CowError(
            f"--cow {overlay} was made against {image} before the image changed (size, mtime or ctime); "
            "use the unchanged base image, or give a new --cow file"
        )


def _check_image_use(spec: JobSpec, image: Path, fs_uuid: str, qemu: bool = False) -> None:
    """--full-boot, --writable-image and --cow, against the image."""
    if spec.full_boot:
        _check_full_boot(image)
    if spec.writable_image:
        if spec.cow is not None:
            raise UsageError("--writable-image and --cow exclude each other: the job writes either the image or the COW")
        # Also as root: UML opens an image without write permission read-only, and the job would fail later.
        if not os.access(image, os.W_OK) or not image.stat().st_mode & 0o222:
            raise UsageError(
                f"--writable-image: {image} is not writable by you; make it writable (chmod u+w) to change it on purpose"
            )
    if spec.cow is not None:
        if spec.cow.is_symlink():  # a job may have left it: UML and QEMU would write where it points
            raise CowError(f"--cow {spec.cow} is a symbolic link; give the COW file itself, or a new file name")
        userpath.require_file(spec.cow, "--cow", CowError, "give the COW file itself, or a new file name")
        if spec.cow.resolve() == image.resolve():
            raise UsageError("--cow names the base image itself; give a separate file for the COW")
        if spec.cow.exists() and qemu:
            _check_overlay(spec.cow, image)
        elif spec.cow.exists():
            cow.check_matches(spec.cow, image, fs_uuid)
            cow.check_writable_without_privilege(spec.cow)
            cow.check_unlocked(spec.cow)


def _auto_changes(jobdir: Path) -> Path | None:
    """apppot-changes.tar.gz in the job directory, merged without being asked for (checked in _put_changes).
    An earlier job may have left it: a link is refused, never followed to a file outside."""
    path = jobdir / AUTO_CHANGES
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        raise UsageError(
            f"{path} is a symbolic link, which AppPot does not follow out of the job directory: "
            "replace it by the archive itself, or pass --changes FILE"
        )
    return path if stat.S_ISREG(mode) else None


def _check_full_boot(image: Path) -> None:
    missing = ext4.missing_paths(image, [SYSTEMD_PATH, AGENT_SERVICE])
    if missing:
        raise UsageError(
            f"--full-boot needs systemd and AppPot's agent service in the image, and {image} lacks {', '.join(missing)}: "
            "build it from a recipe whose packages include systemd, or start it without --full-boot"
        )


def run_base() -> Path:
    """Where run directories go: $TMPDIR, or /tmp where its path could not be given to UML."""
    base = os.environ.get("TMPDIR") or "/tmp"
    return Path(base if _HOSTFS_SAFE.fullmatch(base) else "/tmp")

"""The commands for hypervisors and clouds: `apppot image export`, `apppot cloud-seed`, `apppot doctor`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from apppot.cli.common import human, parser_class
from apppot.cli.start import split_command
from apppot.errors import AppPotError, UsageError
from apppot.say import Say
from apppot.say import say_stderr as say

if TYPE_CHECKING:
    from apppot.submit.seed_files import LeftOut

PrintRecord = Callable[[Mapping[str, object], bool], None]


def image_export(ns: argparse.Namespace, say: Say, print_record: PrintRecord) -> int:
    from apppot.images import export, selection

    image = selection.choose_image(ns.image).path  # a name, sha256:PREFIX or a file, as apppot start takes them
    fmt = export.DiskFormat.from_name(ns.format) if ns.format else export.DiskFormat.from_suffix(ns.output)
    if fmt is None:
        raise UsageError(
            f"cannot tell the disk format from the name {ns.output.name!r}: end it in .qcow2, .vmdk, .vdi, .img "
            "or .raw, or pass --format"
        )
    exported = export.export(image, ns.output, fmt, (lambda _m: None) if ns.json else say, ns.force)
    print_record(
        {
            "path": str(exported.path),
            "format": exported.format.value,
            "used_bytes": exported.size,
            "kernel": exported.kernel,
            "seconds": round(exported.seconds, 2),
            "boots": "by firmware (BIOS): syslinux, Debian's kernel, AppPot's agent; the job from a cidata volume",
        },
        ns.json,
    )
    return 0


def cmd_cloud_seed(argv: Sequence[str]) -> int:

    before, command = split_command(argv)
    p = parser_class()(
        prog="apppot cloud-seed",
        description="Write a NoCloud 'cidata' volume carrying a job, for an exported image booted without AppPot. "
        "The job's output and exit status appear on the VM's console (first serial line).",
        epilog="example: apppot cloud-seed --image debian-dev -o seed.iso -- ./run.sh",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the seed volume to write (ISO 9660)")
    p.add_argument("--image", help="check that this image's agent reads user-data (a cache name or a file)")
    p.add_argument("--jobdir", type=Path, default=Path.cwd(), help="the files the job gets at /home/user/job (default: .)")
    p.add_argument("--no-jobdir", action="store_true", help="send no files; the job runs in an empty /home/user/job")
    p.add_argument("--user", help="the job's user in the VM (root: run as root; as host root: uid 1000)")
    p.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(before)
    from apppot.protocol import GuestJob
    from apppot.runner import guest_identity
    from apppot.submit import cloud

    if ns.image:
        from apppot.images import selection

        image = selection.choose_image(ns.image).path
        if not cloud.image_reads_user_data(image):
            raise UsageError(f"the agent in {image} predates cloud user-data; rebuild the image with this AppPot")
    jobdir = None if ns.no_jobdir else ns.jobdir
    if jobdir is not None and not jobdir.is_dir():
        raise UsageError(f"job directory {jobdir} does not exist; create it, pass --jobdir DIR or --no-jobdir")
    uid, gid, user, group = guest_identity(ns.user, None, host_files=False)
    job = GuestJob(argv=tuple(command) if command is not None else None, uid=uid, gid=gid, user=user, group=group)
    seed = cloud.make_seed(job, ns.output, jobdir, force=ns.force)
    record = {
        "path": str(seed.path),
        "instance_id": seed.instance_id,
        "files": seed.files,
        "user_data_bytes": seed.user_data_bytes,
        "bytes": seed.size,
        "left_out": [{"path": str(o.path), "what": o.what, "bytes": o.size} for o in seed.left_out],
    }
    if ns.json:
        import json

        print(json.dumps(record))
    else:
        for line in left_out_lines(seed.left_out):
            say(line)
        say(
            f"wrote {seed.path}, {human(seed.size)} (cidata: user-data, meta-data, {seed.files} job files); attach it "
            "to a VM of an exported image, e.g. qemu-system-x86_64 -m 512M -drive file=app.qcow2 -cdrom "
            f"{seed.path} -nographic"
        )
    return 0


def left_out_lines(left_out: Sequence[LeftOut], limit: int = 5) -> list[str]:
    """What cloud-seed left out of the job directory: a line a file up to limit, then one for the rest."""
    lines = [f"left out of the seed: {o.path} ({o.what}, {human(o.size)})" for o in left_out[:limit]]
    rest = left_out[limit:]
    if rest:
        size = human(sum(o.size for o in rest))
        lines.append(f"left out of the seed: {len(rest)} more disk images, seeds or COW files ({size})")
    return lines


class Check(NamedTuple):
    name: str
    ok: bool | None  # None: informational
    detail: str


def _check(name: str, probe: Callable[[], str]) -> Check:
    try:
        return Check(name, True, probe())
    except AppPotError as e:
        return Check(name, False, str(e))


def map_count_check(count: int) -> Check:
    """vm.max_map_count and the memory it covers, by the rules `apppot start` applies (spec.choose_mem):
    what a start without --mem gets, and the most an explicit --mem gets."""
    from apppot.spec import DEFAULT_MEM, MIB, MIN_MEM, choose_mem, map_count_needed, mem_for_map_count

    most = mem_for_map_count(count) // MIB
    if most * MIB < MIN_MEM:
        return Check(
            "vm.max_map_count",
            False,
            f"{count}: UML guests are refused (it covers {most} MiB; refused below {MIN_MEM // MIB} MiB): "
            f"sudo sysctl -w vm.max_map_count={map_count_needed(DEFAULT_MEM)} allows the default {DEFAULT_MEM // MIB} MiB",
        )
    default = choose_mem(None, count, 1 << 62).bytes // MIB
    more = map_count_needed((2 * most) * MIB)
    return Check(
        "vm.max_map_count",
        None,
        f"{count}: a start without --mem gets {default} MiB; UML guests get up to {most} MiB (a larger --mem is lowered "
        f"to it; sudo sysctl -w vm.max_map_count={more} allows {2 * most} MiB)",
    )


def doctor_checks(say: Say, reprobe: bool) -> list[Check]:
    from apppot import guest_kernel, kvm
    from apppot.backends.choice import Backend, decide, requested
    from apppot.backends.qemu import QEMU_IMG, QEMU_IMG_PACKAGE, QEMU_PACKAGE, QEMU_SYSTEM
    from apppot.images import export
    from apppot.kernel import find_kernel, kernel_traits
    from apppot.network import choose_network
    from apppot.proc import run, which
    from apppot.sandbox import find_bwrap, probe

    checks: list[Check] = []

    def uml() -> str:
        found = find_kernel(None)
        traits = kernel_traits(found.path)
        net = choose_network(traits, None)
        mode = "seccomp" if traits.seccomp_works else "ptrace"
        return f"{found.path} ({found.source.value}), {mode} mode, network: {net.kind.value if net else 'none'}"

    checks.append(_check("uml kernel", uml))
    reason = probe(find_bwrap())
    checks.append(Check("isolation", reason is None, reason or "bubblewrap namespaces work: the guest sees only its job"))
    with contextlib.suppress(OSError, ValueError):
        checks.append(map_count_check(int(Path("/proc/sys/vm/max_map_count").read_text())))
    qemu = which(QEMU_SYSTEM)
    if qemu:
        version = run([qemu, "--version"], check=False).stdout.decode(errors="replace").splitlines()[:1]
        checks.append(Check("qemu", True, f"{qemu}: {version[0] if version else '?'}"))
    else:
        checks.append(Check("qemu", False, f"{QEMU_SYSTEM} is not installed: sudo apt-get install {QEMU_PACKAGE}"))
    img = which(QEMU_IMG)
    checks.append(Check("qemu-img", img is not None, img or f"not installed: sudo apt-get install {QEMU_IMG_PACKAGE}"))

    def tools() -> str:
        export.check_tools()
        return "syslinux, mtools, dosfstools, sfdisk and qemu-img are installed"

    checks.append(_check("image export", tools))
    xorriso = which("xorriso")
    checks.append(Check("cloud seeds", xorriso is not None, xorriso or "xorriso is not installed: sudo apt-get install xorriso"))
    kernel = guest_kernel.installed()
    checks.append(
        Check(
            "guest kernel",
            None,
            f"{kernel.package} {kernel.version} in {kernel.directory}"
            if kernel
            else f"not fetched yet: the first QEMU job or export downloads Debian's {guest_kernel.METAPACKAGE}",
        )
    )
    state = kvm.state(say, reprobe=reprobe)
    checks.append(Check("kvm", state.works, state.reason))
    try:
        backend, where = requested(None, os.environ)
        checks.append(Check("backend", None, f"{backend.value} ({where})"))
        auto = decide(Backend.AUTO, "--backend auto", None, lambda: state)
        checks.append(Check("backend auto", None, auto.why))
    except AppPotError as e:
        checks.append(Check("backend", False, str(e)))
    return checks


def cmd_doctor(argv: Sequence[str]) -> int:

    p = parser_class()(
        prog="apppot doctor",
        description="What AppPot found on this host: kernels, isolation, QEMU, KVM (probed by booting a guest), "
        "and which backend auto picks, with the reasons.",
    )
    p.add_argument("--reprobe", action="store_true", help="probe KVM again instead of using the cached result")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    checks = doctor_checks(say, ns.reprobe)
    if ns.json:
        import json

        print(json.dumps([c._asdict() for c in checks]))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            mark = {True: "ok", False: "--", None: "  "}[c.ok]
            sys.stdout.write(f"{mark} {c.name.ljust(width)}  {c.detail}\n")
    return 0

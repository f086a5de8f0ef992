"""Command-line entry points: `apppot` (subcommands) and `apppot-start`.

Only this module turns AppPotError into a message and an exit code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from apppot import __version__, hostfds
from apppot.errors import EXIT_APPPOT_ERROR, EXIT_GUEST_DIED, AppPotError, JobDirError, UsageError
from apppot.spec import DEFAULT_BOOT_TIMEOUT_S, Isolation, JobSpec, parse_mem, parse_seconds

if TYPE_CHECKING:
    import argparse

    from apppot.images.store import StoredImage

START_EPILOG = f"""\
which command runs (first match wins):
  1. the command after --  (or after the options)
  2. an executable apppot-run in the job directory
  3. /home/user/apppot-autorun inside the image
  4. an interactive shell, when stdin and stdout are a terminal
     (otherwise AppPot says there is no command and exits {EXIT_APPPOT_ERROR})

exit status:
  the job's own exit status (128+N if the job was killed by signal N);
  {EXIT_APPPOT_ERROR} if AppPot could not start or run the job (the reason is printed);
  {EXIT_GUEST_DIED} if the guest ended without reporting a status (kernel panic, killed UML or QEMU),
      or left something no agent writes where the host reads its reports (the line says what);
  128+N if apppot start itself was stopped by signal N (SIGINT, SIGTERM).

environment: APPPOT_IMAGE (--image), APPPOT_MEM (--mem), APPPOT_KERNEL (--kernel), APPPOT_CPU (--cpu),
APPPOT_BACKEND (--backend), APPPOT_KVM (1: --kvm, 0: --no-kvm), APPPOT_HOST_LOOPBACK (1: --host-loopback).
"""


class _Option(NamedTuple):
    flags: tuple[str, ...]
    dest: str
    kind: str  # value, path (a value made a Path), append, true, false (the --net pair), flag
    metavar: str | None
    help: str
    choices: tuple[str, ...] = ()
    default: str | None = None  # of a value option

    def initial(self) -> object:
        """The value before the command line is read (a new list for append options)."""
        return [] if self.kind == "append" else False if self.kind == "flag" else self.default


# The options of `apppot start`, once. They build the argparse parser (help, errors) and drive
# _fast_parse, which reads well-formed command lines without argparse: importing and building it
# would cost every job start milliseconds.
START_OPTIONS = (
    _Option(
        ("--image",),
        "image",
        "value",
        "IMG",
        "appliance image file, or the name of one in the cache (default: $APPPOT_IMAGE, else the tiny appliance)",
    ),
    _Option(("--apppot", "--appot"), "apppot", "value", "[COW,]IMG", "seed syntax: image, or COW file and image"),
    _Option(("--cow",), "cow", "path", "FILE", "keep the job's changes in FILE across jobs"),
    _Option(
        ("--writable-image",), "writable_image", "flag", None, "no COW: the job changes the image itself (e.g. apppot-snap base)"
    ),
    _Option(("--changes",), "changes", "path", "TAR", "merge this apppot-snap changes archive before the job"),
    _Option(("--jobdir",), "jobdir", "path", "DIR", "shown at /home/user/job (default: .)"),
    _Option(
        ("--unsafe-jobdir",),
        "unsafe_jobdir",
        "flag",
        None,
        "accept /, a system directory or your whole home as job directory",
    ),
    _Option(("--mem",), "mem", "value", "SIZE", "guest memory, e.g. 512M or 2G (default: $APPPOT_MEM, else 512M)"),
    _Option(("--net",), "net", "true", None, "outbound network through a user-space NAT"),
    _Option(("--no-net",), "net", "false", None, "no network"),
    _Option(
        ("--host-loopback",),
        "host_loopback",
        "flag",
        None,
        "let the guest reach services on the host's 127.0.0.1 as 10.0.2.2 (implies --net; $APPPOT_HOST_LOOPBACK=1)",
    ),
    _Option(("--kernel", "--uml", "--linux"), "kernel", "value", "PATH", "UML kernel ($APPPOT_KERNEL)"),
    _Option(("--id",), "instance_id", "value", "NAME", "instance name (UML umid)"),
    _Option(("--extra",), "extra", "append", "ARG", "extra kernel parameter (repeatable)"),
    _Option(("--user",), "user", "value", "NAME", "name of the job's user in the guest (root: run as root)"),
    _Option(("--group",), "group", "value", "NAME", "name of the job's group in the guest"),
    _Option(
        ("--isolation",), "isolation", "value", None, "auto: warn without namespaces; strict: refuse", ("auto", "strict"), "auto"
    ),
    _Option(
        ("--backend",),
        "backend",
        "value",
        None,
        "uml (default), qemu, or auto: QEMU with KVM where a guest boots with it, else uml ($APPPOT_BACKEND)",
        ("uml", "qemu", "auto"),
        None,
    ),
    _Option(("--kvm",), "kvm", "true", None, "QEMU: require KVM (fail if it does not work here)"),
    _Option(("--no-kvm",), "kvm", "false", None, "QEMU: emulate the CPU (TCG) even where KVM works"),
    _Option(("--cpu",), "cpu", "value", "N", "host CPU for the guest: a number, auto (default, $APPPOT_CPU) or all"),
    _Option(("--full-boot",), "full_boot", "flag", None, "boot the image's own init (systemd) with its services, then the job"),
    _Option(
        ("-n", "--no-stdin"), "no_stdin", "flag", None, "the job's stdin is /dev/null: AppPot never reads its own (as ssh -n)"
    ),
    _Option(("--console-log",), "console_log", "path", "FILE", "write the guest's console here"),
    _Option(
        ("--boot-timeout",),
        "boot_timeout",
        "value",
        "SECONDS",
        f"end the job ({EXIT_GUEST_DIED}) unless AppPot's agent starts by then (default: {DEFAULT_BOOT_TIMEOUT_S:g})",
    ),
    _Option(("-v", "--verbose"), "verbose", "flag", None, "say what AppPot does"),
)


def _parser_class() -> type[argparse.ArgumentParser]:
    """argparse's parser, raising instead of exiting, so errors take the usual one-line path."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise UsageError(f"{message} (see {self.prog} --help)")

    return Parser


def _start_parser(prog: str) -> argparse.ArgumentParser:
    import argparse

    p = _parser_class()(
        prog=prog,
        description="Boot an appliance and run one job in it, as if the command ran on the host.",
        epilog=START_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for o in START_OPTIONS:
        if o.kind in ("true", "false"):
            action = "store_true" if o.kind == "true" else "store_false"
            if o.dest not in groups:  # one group per pair (--net/--no-net): an empty group breaks --help
                groups[o.dest] = p.add_mutually_exclusive_group()
            groups[o.dest].add_argument(*o.flags, dest=o.dest, action=action, default=None, help=o.help)
        elif o.kind == "flag":
            p.add_argument(*o.flags, dest=o.dest, action="store_true", help=o.help)
        elif o.kind == "append":
            p.add_argument(*o.flags, dest=o.dest, action="append", default=o.initial(), metavar=o.metavar, help=o.help)
        else:
            p.add_argument(
                *o.flags,
                dest=o.dest,
                metavar=o.metavar,
                type=Path if o.kind == "path" else str,
                choices=o.choices or None,
                default=o.initial(),
                help=o.help,
            )
    p.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _fast_parse(before: list[str]) -> SimpleNamespace | None:
    """The options before '--' as argparse would read them, or None for anything unusual
    (help, unknown or abbreviated options, missing values, conflicts): argparse then answers."""
    by_flag = {flag: o for o in START_OPTIONS for flag in o.flags}
    values = {o.dest: o.initial() for o in START_OPTIONS}
    seen: set[str] = set()
    i = 0
    while i < len(before):
        arg = before[i]
        if not arg.startswith("-") or arg == "-":
            values["command"] = before[i:]
            break
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        o = by_flag.get(flag)
        if o is None or (o.kind in ("true", "false") and o.dest in seen):
            return None
        seen.add(o.dest)
        if o.kind in ("true", "false", "flag"):
            if eq:
                return None
            values[o.dest] = o.kind != "false"
        else:
            if not eq:
                i += 1
                if i == len(before) or before[i].startswith("-"):
                    return None
                inline = before[i]
            if o.choices and inline not in o.choices:
                return None
            if o.kind == "append":
                values[o.dest].append(inline)  # type: ignore[attr-defined]
            else:
                values[o.dest] = Path(inline) if o.kind == "path" else inline
        i += 1
    values.setdefault("command", [])
    return SimpleNamespace(**values)


def _split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Options before the first '--', and the command after it (None if no '--')."""
    args = list(argv)
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1 :]
    return args, None


def _image_and_cow(ns: argparse.Namespace | SimpleNamespace) -> tuple[Path | None, Path | None]:
    image = ns.image or None
    cow_file = ns.cow
    if ns.apppot:
        value = ns.apppot
        sep = next((s for s in (",", ":") if s in value and not Path(value).exists()), None)
        if sep:
            cow_text, image_text = value.split(sep, 1)
            cow_file = cow_file or Path(cow_text)
            image = image or image_text
        else:
            image = image or value
    image = image or os.environ.get("APPPOT_IMAGE") or None
    return (Path(image) if image else None), cow_file


HOST_LOOPBACK_ENV = "APPPOT_HOST_LOOPBACK"


def _net(net: bool | None, host_loopback: bool) -> bool | None:
    if host_loopback and net is False:
        raise UsageError("--host-loopback needs the network: drop --no-net (or unset APPPOT_HOST_LOOPBACK)")
    return True if host_loopback else net


def parse_start(argv: Sequence[str], prog: str = "apppot start") -> JobSpec:
    before, after = _split_command(argv)
    ns = _fast_parse(before) or _start_parser(prog).parse_args(before)
    command = after if after is not None else (ns.command or None)
    if after is not None and ns.command:
        raise UsageError(f"unexpected arguments before --: {' '.join(ns.command)}")
    image, cow_file = _image_and_cow(ns)
    mem_text = ns.mem or os.environ.get("APPPOT_MEM")
    host_loopback = ns.host_loopback or os.environ.get(HOST_LOOPBACK_ENV) == "1"
    return JobSpec(
        argv=tuple(command) if command is not None else None,
        jobdir=ns.jobdir if ns.jobdir is not None else _cwd(),
        unsafe_jobdir=ns.unsafe_jobdir,
        image=image,
        cow=cow_file,
        mem_bytes=parse_mem(mem_text) if mem_text else None,
        net=_net(ns.net, host_loopback),
        host_loopback=host_loopback,
        kernel=ns.kernel,
        instance_id=ns.instance_id,
        extra=tuple(ns.extra),
        user=ns.user,
        group=ns.group,
        isolation=Isolation(ns.isolation),
        verbose=ns.verbose,
        console_log=ns.console_log,
        full_boot=ns.full_boot,
        changes=ns.changes,
        writable_image=ns.writable_image,
        cpu=ns.cpu or os.environ.get("APPPOT_CPU") or None,
        backend=ns.backend,
        kvm=ns.kvm if ns.kvm is not None else _kvm_env(),
        no_stdin=ns.no_stdin,
        boot_timeout_s=parse_seconds(ns.boot_timeout, "--boot-timeout") if ns.boot_timeout else DEFAULT_BOOT_TIMEOUT_S,
    )


def _cwd() -> Path:
    try:
        return Path.cwd()
    except OSError as e:
        raise JobDirError(
            f"the current directory cannot be used as the job directory ({e.strerror}): cd to one, or pass --jobdir DIR"
        ) from None


def _kvm_env() -> bool | None:
    value = os.environ.get("APPPOT_KVM", "")
    if value in ("", "auto"):
        return None
    if value in ("0", "1"):
        return value == "1"
    raise UsageError(f"APPPOT_KVM={value!r}: use 1 (require KVM), 0 (no KVM) or auto")


def cmd_start(argv: Sequence[str], prog: str = "apppot start") -> int:
    from apppot.start import start

    spec = parse_start(argv, prog)
    if spec.verbose:
        from apppot import proc

        proc.verbose = _say
    return start(spec)


def cmd_image(argv: Sequence[str]) -> int:
    p = _parser_class()(prog="apppot image", description="Appliance images.")
    sub = p.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build an appliance from a recipe (TOML) into the cache")
    build.add_argument("recipe", type=Path, help="the recipe file, e.g. examples/debian-dev.toml")
    build.add_argument("--force", action="store_true", help="rebuild even if built from the same inputs")
    build.add_argument("--quiet", action="store_true", help="no progress lines")
    build.add_argument("--json", action="store_true", help="machine-readable output")
    tiny_build = sub.add_parser("build-tiny", help="build the tiny default appliance into the cache")
    tiny_build.add_argument("--force", action="store_true", help="rebuild even if cached")
    tiny_build.add_argument("--json", action="store_true", help="machine-readable output")
    listing = sub.add_parser("list", help="the images in the cache: names, sizes, ids")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    remove = sub.add_parser("remove", help="remove the images built under a name from the cache")
    remove.add_argument("name", help="an image name from 'apppot image list'")
    remove.add_argument("--old", action="store_true", help="keep the newest, remove the older ones")
    info = sub.add_parser("info", help="an image's recipe, ids, agent and size")
    info.add_argument("image", help="an image name from the cache, or an image file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    export = sub.add_parser("export", help="write an image as a disk any hypervisor boots by itself (no AppPot needed)")
    export.add_argument("image", help="an image name from the cache, or an image file")
    export.add_argument("-o", "--output", type=Path, required=True, help="the disk file to write")
    export.add_argument(
        "--format",
        choices=["qcow2", "vmdk", "vdi", "raw"],
        help="disk format (default: from the -o suffix, .img meaning raw): qcow2 for QEMU/KVM and OpenStack, "
        "vmdk for VMware and VirtualBox, vdi for VirtualBox, raw for Xen",
    )
    export.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    from apppot.images import ext4, store, tiny

    if ns.action == "export":
        from apppot import cli_vm

        return cli_vm.image_export(ns, _say, _print_record)
    if ns.action == "build":
        from apppot.images import debian, recipe

        built = debian.build(recipe.parse_recipe(ns.recipe), force=ns.force, quiet=ns.quiet or ns.json, say=_say)
        record: dict[str, object] = {"path": str(built.path), "reused": built.reused, **built.record._asdict()}
    elif ns.action == "build-tiny":
        made = tiny.build(force=ns.force)
        record = {"name": made.name, "path": str(made.path), "id": tiny.image_id(made.path)}
    elif ns.action == "remove":
        for path in store.remove(ns.name, keep_newest=ns.old):
            print(f"removed {path}")
        return 0
    elif ns.action == "list":
        rows = [_image_row(image) for image in store.stored_images()]
        if ns.json:
            import json

            print(json.dumps(rows))
        else:
            _print_table(rows, ["name", "id", "size", "used", "built", "path"])
        return 0
    else:
        path = store.resolve_image(ns.image)
        stored = next((i for i in store.stored_images() if i.path == path.resolve()), None)
        record = _image_row(stored) if stored else {"path": str(path)}
        record |= {"uuid": ext4.filesystem_uuid(path)}
        if not stored or stored.record is None:
            record["id"] = tiny.image_id(path)
    _print_record(record, ns.json)
    return 0


def _image_row(image: StoredImage) -> dict[str, object]:
    st = image.path.stat()
    row: dict[str, object] = {
        "name": image.record.name if image.record else "tiny",
        "id": (image.record.content_id if image.record else "")[:16] or None,
        "size": _human(image.record.size_bytes if image.record else st.st_size),
        "used": _human(st.st_blocks * 512),
        "built": image.record.built if image.record else None,
        "path": str(image.path),
    }
    if image.record:
        row |= {"content_id": image.record.content_id, **image.record._asdict()}
    return row


def _human(size: int) -> str:
    """2147483648 -> '2.0G'."""
    value = float(size)
    for unit in ("B", "K", "M"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"


def _print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    if not rows:
        print("no images in the cache (apppot image build RECIPE.toml, apppot image build-tiny)")
        return
    cells = [[str(row.get(c) or "-") for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def cmd_changes(argv: Sequence[str]) -> int:
    p = _parser_class()(prog="apppot changes", description="Changes archives made by apppot-snap changes.")
    sub = p.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="what an archive adds, modifies and deletes, and the base it needs")
    show.add_argument("archive", type=Path)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    from apppot import snap

    try:
        info, members = snap.check_archive(str(ns.archive))
    except snap.SnapError as e:
        raise UsageError(str(e)) from None
    if ns.json:
        import json

        print(json.dumps({**info._asdict(), "members": len(members), "bytes": ns.archive.stat().st_size}))
        return 0
    print(f"archive: {ns.archive} ({ns.archive.stat().st_size} bytes)")
    print(f"base: {info.base}")
    print(f"made: {info.created} by {info.tool}")
    for label, paths in (("adds", info.added), ("modifies", info.modified), ("deletes", info.deleted)):
        print(f"{label} ({len(paths)}):")
        for path in paths:
            print(f"  {path}")
    return 0


def cmd_submit(argv: Sequence[str]) -> int:
    before, after = _split_command(argv)
    p = _parser_class()(prog="apppot submit", description="Hand an AppPot job to a batch system.")
    p.add_argument("--to", dest="target", choices=["slurm", "arc"], required=True, help="the batch system or Grid middleware")
    p.add_argument("--ce", metavar="URL", help="ARC: the compute element, e.g. https://ce.example.org:443/arex")
    p.add_argument("--image", help="image file or cache name (default: the tiny appliance); the worker must see it")
    p.add_argument("--changes", type=Path, metavar="TAR", help="an apppot-snap changes archive to merge before the job")
    p.add_argument("--mem", default="256M", help="the guest's memory (default 256M); the batch job asks for 64 MiB more")
    p.add_argument("--time", default="1:00:00", help="wall-time limit, e.g. 30 (minutes) or 2:00:00 (default 1:00:00)")
    p.add_argument("--cores", type=int, default=1, help="cores to reserve (default 1)")
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="copy into the job directory (repeatable)",
    )
    p.add_argument(
        "--output", dest="outputs", action="append", default=[], metavar="NAME", help="fetch from the job directory (repeatable)"
    )
    p.add_argument("--name", default="apppot", help="the batch job's name")
    p.add_argument("--dry-run", action="store_true", help="print the batch script instead of submitting it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(before)
    if not after:
        raise UsageError("give the command to run after --, e.g. apppot submit --to slurm -- ./run.sh")
    from apppot.images.store import resolve_image
    from apppot.prepare import default_image
    from apppot.submit import jobs
    from apppot.submit.job import BatchJob, check_job_name, check_output_name, parse_wall_time

    image: Path | None = None  # ARC without --image: the site's image (its APPPOT runtime environment names it)
    if ns.image or ns.target != "arc":
        image = resolve_image(ns.image) if ns.image else default_image(_say)
        if not image.is_file():
            raise UsageError(f"image {image} does not exist; give an image file or a name from 'apppot image list'")
    if ns.cores < 1:
        raise UsageError("--cores must be at least 1")
    job = BatchJob(
        argv=tuple(after),
        image=image.resolve() if image else None,
        mem_bytes=parse_mem(ns.mem),
        wall_seconds=parse_wall_time(ns.time),
        cores=ns.cores,
        changes=ns.changes.resolve() if ns.changes else None,
        inputs=tuple(i.resolve() for i in ns.inputs),
        outputs=tuple(check_output_name(o) for o in ns.outputs),
        name=check_job_name(ns.name),
    )
    if job.changes is not None:
        from apppot import snap

        try:
            snap.check_archive(str(job.changes))
        except snap.SnapError as e:
            raise UsageError(str(e)) from None
    record, script = jobs.submit(job, ns.target, ns.dry_run, ce=ns.ce)
    if record is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(os.fsencode(script))  # the command's bytes as they are, UTF-8 or not
    elif ns.json:
        import json

        print(json.dumps(record._asdict()))
    else:
        print(record.job_id)
    return 0


def cmd_status(argv: Sequence[str]) -> int:
    p = _parser_class()(prog="apppot status", description="The state of a submitted job.")
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    from apppot.submit import jobs

    s = jobs.status(ns.job_id)
    if ns.json:
        import json

        print(json.dumps(s._asdict()))
    else:
        code = f", exit code {s.exit_code}" if s.final and s.exit_code is not None else ""
        print(f"{s.job_id}: {s.state}{code}" + (f" ({s.explanation})" if s.explanation else ""))
    return 0


def cmd_fetch(argv: Sequence[str]) -> int:
    p = _parser_class()(prog="apppot fetch", description="Copy a job's stdout, stderr and outputs into ./JOBID/.")
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("--force", action="store_true", help="write into ./JOBID/ even if it exists, replacing files there")
    p.add_argument("--max-size", default="16G", metavar="SIZE", help="refuse a file larger than SIZE (default 16G)")
    ns = p.parse_args(argv)
    from apppot.submit import jobs, results

    limit = results.parse_size(ns.max_size)
    target, report = jobs.fetch(ns.job_id, Path.cwd(), ns.force, limit)
    print(f"{target}: {', '.join(report.copied) or 'nothing'}")
    if report.missing:
        _say(f"not there (yet): {', '.join(report.missing)}")
    for refused in report.refused:  # what the job left there is not the user's: never followed, never opened
        sys.stderr.write(
            f"apppot: error: refused {refused.name!r} from the job: {refused.reason}; copy it by hand if you trust it\n"
        )
    return EXIT_APPPOT_ERROR if report.refused else 0


def cmd_clean(argv: Sequence[str]) -> int:
    return _on_job(argv, "clean", "Forget a finished job: its files on the CE and here.")


def cmd_cancel(argv: Sequence[str]) -> int:
    return _on_job(argv, "cancel", "Cancel a submitted job.")


def _on_job(argv: Sequence[str], action: str, description: str) -> int:
    """`apppot clean|cancel JOBID`: apppot.submit.jobs.clean or .cancel, which say nothing on success."""
    p = _parser_class()(prog=f"apppot {action}", description=description)
    p.add_argument("job_id", metavar="JOBID")
    ns = p.parse_args(argv)
    from apppot.submit import jobs

    {"clean": jobs.clean, "cancel": jobs.cancel}[action](ns.job_id)
    return 0


def cmd_testbed(argv: Sequence[str]) -> int:
    p = _parser_class()(prog="apppot testbed", description="A throw-away Slurm cluster on this machine (root).")
    sub = p.add_subparsers(dest="action", required=True)
    start = sub.add_parser("up", help="start munged, slurmctld and the nodes' slurmd")
    start.add_argument("--nodes", type=int, default=1, help="simulated nodes on this machine (default 1)")
    start.add_argument("--arc", metavar="USER", help="also an ARC CE in front of it, with USER as the grid user")
    start.add_argument(
        "--timeout", type=float, default=60, metavar="SECONDS", help="how long the nodes may take to be idle (default 60)"
    )
    sub.add_parser("down", help="stop what 'up' started")
    sub.add_parser("env", help="the SLURM_CONF setting for the cluster's clients")
    ns = p.parse_args(argv)
    from apppot import testbed

    if ns.action == "up":
        if ns.nodes < 1:
            raise UsageError("--nodes must be at least 1")
        if ns.timeout <= 0:
            raise UsageError("--timeout must be more than 0 seconds")
        bed, took = testbed.up(ns.nodes, timeout=ns.timeout, arc_user=ns.arc)
        _say(f"test cluster up in {took:.1f} s: {bed.nodes} node(s), logs in {bed.directory / 'log'}")
        _say(f"AppPot for every user's jobs: {bed.site_apppot} (kernel: {bed.site_apppot.parent.parent / 'kernel' / 'linux'})")
        if ns.arc:
            _say(f"ARC CE: https://localhost:8443/arex, grid user {ns.arc} (proxy made)")
        print(f"export SLURM_CONF={bed.conf}")
    elif ns.action == "down":
        stopped = testbed.down()
        for note in stopped.notes:
            _say(note)
        nothing = "nothing" if stopped.notes else "nothing (no test cluster was running)"
        _say(f"stopped {', '.join(stopped.names) if stopped.names else nothing}")
    else:
        print(f"export SLURM_CONF={testbed.testbed_dir() / 'etc' / 'slurm.conf'}")
    return 0


def cmd_kernel(argv: Sequence[str]) -> int:
    p = _parser_class()(prog="apppot kernel", description="AppPot's own User-mode Linux kernel.")
    sub = p.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build AppPot's kernel from Debian's kernel source into the cache (~4 min)")
    build.add_argument("--force", action="store_true", help="rebuild even if this version and config are built")
    build.add_argument("--jobs", type=int, metavar="N", help="parallel compile jobs (default: number of CPUs)")
    build.add_argument("--json", action="store_true", help="machine-readable output")
    info = sub.add_parser("info", help="the kernel `apppot start` would use, and what it can do on this host")
    info.add_argument("--kernel", metavar="PATH", help="this kernel instead")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    if ns.action == "build":
        from apppot import kernel_build

        built = kernel_build.build(force=ns.force, jobs=ns.jobs, say=_say)
        record: dict[str, object] = {"path": str(built.directory / "linux"), "reused": built.reused, **built.record._asdict()}
    else:
        from apppot.kernel import KernelRecord, find_kernel, kernel_traits
        from apppot.network import choose_network

        found = find_kernel(ns.kernel)
        own = KernelRecord.read(found.path)
        traits = kernel_traits(found.path, _say)
        net = choose_network(traits, None)
        record = {
            "path": str(found.path),
            "chosen_by": found.source.value,
            **(own._asdict() if own else {"release": None, "source_package": "user-mode-linux (Debian)"}),
            "seccomp_supported": traits.seccomp_option,
            "seccomp_on_this_host": traits.seccomp_works,
            "lpj": traits.lpj,
            # What `apppot start` would pick here, not only what the kernel could drive.
            "network": "vde slirp plugin" if net else "none",  # a NAT helper outside UML's namespace
        }
    _print_record(record, ns.json)
    return 0


def _say(message: str) -> None:
    """One line on stderr; a stderr that fails (full, closed) cannot be told, and does not crash us."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.write(f"apppot: {message}\n")
        sys.stderr.flush()


def _print_record(record: Mapping[str, object], as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps(record))
    else:
        for key, value in record.items():
            print(f"{key}: {value}")


def _run(func_argv: Sequence[str], prog: str) -> int:
    try:
        if prog == "apppot-start":
            return cmd_start(func_argv, prog)
        if func_argv[:1] == ["start"]:  # the common case, without building a parser
            return cmd_start(func_argv[1:])
        p = _parser_class()(prog="apppot", description="Run whole Linux appliances as ordinary batch jobs.")
        p.add_argument("--version", action="version", version=f"apppot {__version__}")
        p.add_argument(
            "subcommand",
            choices=[
                "start",
                "image",
                "kernel",
                "changes",
                "submit",
                "status",
                "fetch",
                "cancel",
                "clean",
                "testbed",
                "cloud-seed",
                "doctor",
            ],
        )
        if not func_argv or func_argv[0] in ("-h", "--help", "--version"):
            p.parse_args(func_argv)
            return 0
        ns = p.parse_args(func_argv[:1])
        rest = func_argv[1:]
        if ns.subcommand == "start":
            return cmd_start(rest)
        if ns.subcommand == "kernel":
            return cmd_kernel(rest)
        if ns.subcommand == "changes":
            return cmd_changes(rest)
        others = {
            "submit": cmd_submit,
            "status": cmd_status,
            "fetch": cmd_fetch,
            "cancel": cmd_cancel,
            "clean": cmd_clean,
            "testbed": cmd_testbed,
        }
        if ns.subcommand in others:
            return others[ns.subcommand](rest)
        if ns.subcommand in ("cloud-seed", "doctor"):
            from apppot import cli_vm

            return cli_vm.cmd_cloud_seed(rest) if ns.subcommand == "cloud-seed" else cli_vm.cmd_doctor(rest)
        return cmd_image(rest)
    except AppPotError as e:
        _say(f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): as SIGPIPE would end us
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # anything not foreseen still gets one line, not a traceback
        sys.stderr.write(f"apppot: error: {_unforeseen(e)}\n")
        return EXIT_APPPOT_ERROR


def _unforeseen(e: OSError) -> str:
    """An OSError no check foresaw, as one line: the file it names, else the error and how to learn more."""
    why = e.strerror or str(e) or type(e).__name__
    if e.filename is not None and not isinstance(e.filename, int):  # an int is a descriptor, which names nothing
        return f"{os.fsdecode(e.filename)}: {why}"
    return f"{why} (an unforeseen {type(e).__name__} naming no file: please report it with the command you ran)"


def main(argv: Sequence[str] | None = None) -> int:
    """`apppot SUBCOMMAND ...`"""
    return _run(sys.argv[1:] if argv is None else argv, "apppot")


def start_main(argv: Sequence[str] | None = None) -> int:
    """`apppot-start ...`, the seed's name for `apppot start`."""
    return _run(sys.argv[1:] if argv is None else argv, "apppot-start")


def _exit(code: int) -> NoReturn:
    """Flush and leave at once: tearing down the interpreter would add milliseconds to every job.

    Nothing is left to clean up by then: the runner has removed its files and stopped its processes
    and its relays have delivered the job's output. What AppPot printed itself and stdout did not
    take is a failure too."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError) as e:
        if code == 0:
            _say(f"error: cannot write stdout: {getattr(e, 'strerror', None) or e}")
            code = EXIT_APPPOT_ERROR
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


def _exit_code(run: Callable[[], int]) -> int:
    try:
        return run()
    except SystemExit as e:  # --help and --version: _exit still checks that stdout took them
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_APPPOT_ERROR)


def entry() -> None:
    hostfds.fill_closed()  # first: nothing AppPot opens may take the number of a closed 0, 1 or 2
    _exit(_exit_code(main))


def start_entry() -> None:
    hostfds.fill_closed()
    _exit(_exit_code(start_main))


__all__ = ["EXIT_GUEST_DIED", "main", "start_main"]

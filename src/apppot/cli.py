"""Command-line entry points: `apppot` (subcommands) and `apppot-start`.

Only this module turns AppPotError into a message and an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from apppot import __version__
from apppot.errors import EXIT_APPPOT_ERROR, EXIT_GUEST_DIED, AppPotError, UsageError
from apppot.sandbox import Isolation
from apppot.spec import JobSpec, parse_mem

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
  {EXIT_GUEST_DIED} if the guest ended without reporting a status (kernel panic, killed UML);
  128+N if apppot start itself was stopped by signal N (SIGINT, SIGTERM).

environment: APPPOT_IMAGE (--image), APPPOT_MEM (--mem), APPPOT_KERNEL (--kernel).
"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so errors take the usual one-line path."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _start_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Boot an appliance and run one job in it, as if the command ran on the host.",
        epilog=START_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", metavar="IMG", help="appliance image (default: $APPPOT_IMAGE, else the tiny appliance)")
    p.add_argument("--apppot", "--appot", metavar="[COW,]IMG", help="seed syntax: image, or COW file and image")
    p.add_argument("--cow", metavar="FILE", type=Path, help="keep the job's changes in FILE across jobs")
    p.add_argument("--jobdir", metavar="DIR", type=Path, default=None, help="shown at /home/user/job (default: .)")
    p.add_argument("--mem", metavar="SIZE", help="guest memory, e.g. 512M or 2G (default: $APPPOT_MEM, else 512M)")
    net = p.add_mutually_exclusive_group()
    net.add_argument("--net", dest="net", action="store_true", default=None, help="outbound network via slirp")
    net.add_argument("--no-net", dest="net", action="store_false", help="no network")
    p.add_argument("--kernel", "--uml", "--linux", dest="kernel", metavar="PATH", help="UML kernel ($APPPOT_KERNEL)")
    p.add_argument("--id", dest="instance_id", metavar="NAME", help="instance name (UML umid)")
    p.add_argument("--extra", action="append", default=[], metavar="ARG", help="extra kernel parameter (repeatable)")
    p.add_argument("--user", metavar="NAME", help="name of the job's user in the guest (root: run as root)")
    p.add_argument("--group", metavar="NAME", help="name of the job's group in the guest")
    p.add_argument("--isolation", choices=[i.value for i in Isolation], default=Isolation.AUTO.value)
    p.add_argument("--console-log", metavar="FILE", type=Path, help="write the guest's console here")
    p.add_argument("-v", "--verbose", action="store_true", help="say what AppPot does")
    p.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Options before the first '--', and the command after it (None if no '--')."""
    args = list(argv)
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1 :]
    return args, None


def _image_and_cow(ns: argparse.Namespace) -> tuple[Path | None, Path | None]:
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


def parse_start(argv: Sequence[str], prog: str = "apppot start") -> JobSpec:
    before, after = _split_command(argv)
    ns = _start_parser(prog).parse_args(before)
    command = after if after is not None else (ns.command or None)
    if after is not None and ns.command:
        raise UsageError(f"unexpected arguments before --: {' '.join(ns.command)}")
    image, cow_file = _image_and_cow(ns)
    mem_text = ns.mem or os.environ.get("APPPOT_MEM")
    return JobSpec(
        argv=tuple(command) if command is not None else None,
        jobdir=ns.jobdir if ns.jobdir is not None else Path.cwd(),
        image=image,
        cow=cow_file,
        mem_bytes=parse_mem(mem_text) if mem_text else None,
        net=ns.net,
        kernel=ns.kernel,
        instance_id=ns.instance_id,
        extra=tuple(ns.extra),
        user=ns.user,
        group=ns.group,
        isolation=Isolation(ns.isolation),
        verbose=ns.verbose,
        console_log=ns.console_log,
    )


def cmd_start(argv: Sequence[str], prog: str = "apppot start") -> int:
    from apppot.runner import start

    spec = parse_start(argv, prog)
    if spec.verbose:
        from apppot import proc

        proc.verbose = _say
    return start(spec)


def cmd_image(argv: Sequence[str]) -> int:
    p = _Parser(prog="apppot image", description="Appliance images.")
    sub = p.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build-tiny", help="build the tiny default appliance into the cache")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--json", action="store_true", help="machine-readable output")
    info = sub.add_parser("info", help="show an image's filesystem UUID and content id")
    info.add_argument("image", type=Path)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    from apppot.images import ext4, tiny

    if ns.action == "build-tiny":
        built = tiny.build(force=ns.force)
        record = {"name": built.name, "path": str(built.path), "id": tiny.image_id(built.path)}
    else:
        record = {"path": str(ns.image), "uuid": ext4.filesystem_uuid(ns.image), "id": tiny.image_id(ns.image)}
    _print_record(record, ns.json)
    return 0


def cmd_kernel(argv: Sequence[str]) -> int:
    p = _Parser(prog="apppot kernel", description="AppPot's own User-mode Linux kernel.")
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

        found = find_kernel(ns.kernel)
        own = KernelRecord.read(found.path)
        traits = kernel_traits(found.path, _say)
        record = {
            "path": str(found.path),
            "chosen_by": found.source.value,
            **(own._asdict() if own else {"release": None, "source_package": "user-mode-linux (Debian)"}),
            "seccomp_supported": traits.seccomp_option,
            "seccomp_on_this_host": traits.seccomp_works,
            "lpj": traits.lpj,
            "network": "vde slirp plugin" if traits.vector_driver and not traits.eth_drivers else "slirp",
        }
    _print_record(record, ns.json)
    return 0


def _say(message: str) -> None:
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
        p = _Parser(prog="apppot", description="Run whole Linux appliances as ordinary batch jobs.")
        p.add_argument("--version", action="version", version=f"apppot {__version__}")
        p.add_argument("subcommand", choices=["start", "image", "kernel"])
        if not func_argv or func_argv[0] in ("-h", "--help", "--version"):
            p.parse_args(func_argv)
            return 0
        ns = p.parse_args(func_argv[:1])
        rest = func_argv[1:]
        if ns.subcommand == "start":
            return cmd_start(rest)
        if ns.subcommand == "kernel":
            return cmd_kernel(rest)
        return cmd_image(rest)
    except AppPotError as e:
        sys.stderr.write(f"apppot: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # anything not foreseen still gets one line, not a traceback
        where = f" {e.filename}" if e.filename else ""
        sys.stderr.write(f"apppot: error:{where}: {e.strerror or e}\n")
        return EXIT_APPPOT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """`apppot SUBCOMMAND ...`"""
    return _run(sys.argv[1:] if argv is None else argv, "apppot")


def start_main(argv: Sequence[str] | None = None) -> int:
    """`apppot-start ...`, the seed's name for `apppot start`."""
    return _run(sys.argv[1:] if argv is None else argv, "apppot-start")


def entry() -> None:
    sys.exit(main())


def start_entry() -> None:
    sys.exit(start_main())


__all__ = ["EXIT_GUEST_DIED", "main", "start_main"]

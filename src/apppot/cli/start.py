"""`apppot start` and `apppot-start`: the command line, read fast when it is well formed, into a JobSpec."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, NamedTuple

from apppot.cli.common import parser_class
from apppot.errors import EXIT_APPPOT_ERROR, EXIT_GUEST_DIED, JobDirError, UsageError
from apppot.say import say_stderr as say
from apppot.spec import DEFAULT_BOOT_TIMEOUT_S, Isolation, JobSpec, parse_mem, parse_seconds

if TYPE_CHECKING:
    import argparse


START_EPILOG = f"""\
which command runs (first match wins):
  1. the command: the words after a -- that comes before it, else everything from the first word
     that is neither an option nor an option's value (its own options and -- included)
  2. an executable apppot-run in the job directory
  3. /home/user/apppot-autorun inside the image
  4. an interactive shell, when stdin and stdout are a terminal
     (otherwise AppPot says there is no command and exits {EXIT_APPPOT_ERROR})

exit status:
  the job's own exit status (128+N if the job was killed by signal N);
  {EXIT_APPPOT_ERROR} if AppPot could not start or run the job (the reason is printed), and also, whatever
      the job's status (the line gives it), if its stdout or stderr could not be written in full (a full
      disk, /dev/full, a closed stream), the guest's disk filled up its host filesystem, or the --record
      file could not be written (the job's own status is then in the line, never lost silently);
  {EXIT_GUEST_DIED} if the guest ended without reporting a status (kernel panic, killed UML or QEMU, AppPot's
      agent not started within --boot-timeout),
      or left something no agent writes where the host reads its reports (the line says what);
  128+N if apppot start itself was stopped by signal N (SIGINT, SIGTERM);
  141 if the reader of the job's stdout or stderr went away (as SIGPIPE ends a program).

image verification:
  an image named by name (--image NAME, --apppot NAME, $APPPOT_IMAGE=NAME) or by content id (--image
  sha256:PREFIX, 8 to 64 hex digits of an id from 'apppot image list') is checked against its record's
  content id before it boots, and any image with --verify (a file: its record NAME.json beside it, or
  the cache's or a site's record of that file; none is an error). An image changed since its record was
  written is refused ({EXIT_APPPOT_ERROR}), naming both ids. The first check of an image hashes it; the id is
  then kept in the cache for that very version of the file (device, inode, size, mtime, ctime).
  The tiny appliance is checked against the id its build wrote beside it (tiny-ID.sha256): under
  --image tiny, and the default one (no --image) under --verify.

environment: APPPOT_IMAGE (--image), APPPOT_VERIFY (1: --verify), APPPOT_MEM (--mem), APPPOT_KERNEL (--kernel),
APPPOT_CPU (--cpu), APPPOT_BACKEND (--backend), APPPOT_KVM (1: --kvm, 0: --no-kvm), APPPOT_HOST_LOOPBACK (1: --host-loopback),
APPPOT_MIN_FREE (the free space the guest's disk needs before the boot; 0 skips the check),
APPPOT_TRUSTED_SIGNERS (an allowed-signers file: only images signed by its signers run, see apppot image verify;
a file allowed_signers in a site image directory does the same, and with both an image must satisfy both;
refused images exit 125),
APPPOT_RECORD (--record).
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
        "appliance image file, the name of one in the cache or a site directory, or sha256:PREFIX of its content id "
        "(default: $APPPOT_IMAGE, else the tiny appliance); a name or sha256: is verified before the boot",
    ),
    _Option(
        ("--verify",),
        "verify",
        "flag",
        None,
        "check the image's bytes against its record's content id before the boot, whatever names it ($APPPOT_VERIFY=1); "
        "signatures: apppot image verify, and a site's policy",
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
    _Option(("--kernel", "--uml", "--linux"), "kernel", "value", "PATH", "UML kernel ($APPPOT_KERNEL); an error under QEMU"),
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
    _Option(
        ("--record",),
        "record",
        "path",
        "FILE",
        "when the job ends, write what ran (image, kernel, changes, command, outcome) as JSON to FILE ($APPPOT_RECORD)",
    ),
    _Option(("-v", "--verbose"), "verbose", "flag", None, "say what AppPot does, and host notices every time"),
)


def _start_parser(prog: str) -> argparse.ArgumentParser:
    import argparse

    p = parser_class()(
        prog=prog,
        usage="%(prog)s [OPTION ...] [--] [COMMAND [ARG ...]]",
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
    return p


# Which flag is which option, for _fast_parse and split_start_argv.
_BY_FLAG = {flag: o for o in START_OPTIONS for flag in o.flags}
_TAKES_VALUE = ("value", "path", "append")


def _fast_parse(before: list[str]) -> SimpleNamespace | None:
    """The options (no command: split_start_argv took it) as argparse would read them, or None for
    anything unusual (help, unknown or abbreviated options, missing values, conflicts, a stray word):
    argparse then answers."""
    values = {o.dest: o.initial() for o in START_OPTIONS}
    seen: set[str] = set()
    i = 0
    while i < len(before):
        arg = before[i]
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        o = _BY_FLAG.get(flag)
        if o is None or (o.kind in ("true", "false") and o.dest in seen):
            return None
        seen.add(o.dest)
        if o.kind not in _TAKES_VALUE:
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
    return SimpleNamespace(**values)


def split_start_argv(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """`apppot start`'s options, and its command (None if there is none).

    The command is what follows a '--' met before any command word; else, as the seed's clients
    write it, everything from the first word that is neither an option nor an option's value, a
    '--' of its own included (`--mem 256M grep -c -- b f.txt`)."""
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return args[:i], args[i + 1 :]
        if not arg.startswith("-") or arg == "-":
            return args[:i], args[i:]
        # A value option's value is never the command, even when it looks like a word; a '--' ends it.
        i += 2 if _takes_next_word(arg) and args[i + 1 : i + 2] != ["--"] else 1
    return args, None


def _takes_next_word(arg: str) -> bool:
    """Whether option word `arg` takes the next word as its value, as argparse reads it: a long option
    (or a unique abbreviation) without '=value', or a cluster of short ones (-nv) ending with one."""
    if arg.startswith("--"):
        if "=" in arg:
            return False
        o = _BY_FLAG.get(arg)
        if o is None:  # argparse takes unique abbreviations (--ima for --image)
            matches = {id(o): o for flag, o in _BY_FLAG.items() if flag.startswith(arg)}
            o = next(iter(matches.values())) if len(matches) == 1 else None
        return o is not None and o.kind in _TAKES_VALUE
    for pos in range(1, len(arg)):
        o = _BY_FLAG.get("-" + arg[pos])
        if o is None:
            return False
        if o.kind in _TAKES_VALUE:  # its value is the rest of the word, or else the next word
            return pos == len(arg) - 1
    return False


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Options before the first '--', and the command after it (None if no '--'): for the commands
    whose command must follow '--' (submit, cloud-seed)."""
    args = list(argv)
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1 :]
    return args, None


def _image_and_cow(ns: argparse.Namespace | SimpleNamespace) -> tuple[Path | None, Path | None]:
    image = ns.image or None
    cow_file = ns.cow
    if ns.apppot == "":
        raise UsageError("--apppot is empty; give --apppot COW,IMG or --apppot IMG")
    if ns.apppot:
        seed_cow, seed_image = split_seed_image(ns.apppot)
        cow_file = cow_file or seed_cow
        image = image or seed_image
    image = image or os.environ.get("APPPOT_IMAGE") or None
    return (Path(image) if image else None), cow_file


def split_seed_image(value: str) -> tuple[Path | None, str]:
    """The seed's `--apppot [COW,]IMG` (or COW:IMG): the COW file, if given, and the image.

    A path may hold a comma or a colon itself: a value naming an existing file is the image, and
    of the places it could be split, the first one after which an existing image is named wins."""
    if Path(value).exists() or value.startswith("sha256:"):  # a content id's colon splits nothing
        return None, value
    places = [i for i, c in enumerate(value) if c in ",:"]
    if not places:
        return None, value
    at = next((i for i in places if Path(value[i + 1 :]).is_file()), None)
    if at is None:  # no image there yet: split at the first comma (else colon); the image's check names it
        at = value.index(",") if "," in value else places[0]
    cow_text, image_text = value[:at], value[at + 1 :]
    if not cow_text or not image_text:
        raise UsageError(
            f"--apppot {value}: the {'COW' if not cow_text else 'image'} is empty; give --apppot COW,IMG or --apppot IMG"
        )
    return Path(cow_text), image_text


HOST_LOOPBACK_ENV = "APPPOT_HOST_LOOPBACK"


def _net(net: bool | None, host_loopback: bool) -> bool | None:
    if host_loopback and net is False:
        raise UsageError("--host-loopback needs the network: drop --no-net (or unset APPPOT_HOST_LOOPBACK)")
    return True if host_loopback else net


def parse_start(argv: Sequence[str], prog: str = "apppot start") -> JobSpec:
    options, command = split_start_argv(argv)
    ns = _fast_parse(options) or _start_parser(prog).parse_args(options)
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
        verify=ns.verify or _verify_env(),
        record=ns.record if ns.record is not None else _env_path(RECORD_ENV),
    )


def _cwd() -> Path:
    try:
        return Path.cwd()
    except OSError as e:
        raise JobDirError(
            f"the current directory cannot be used as the job directory ({e.strerror}): cd to one, or pass --jobdir DIR"
        ) from None


RECORD_ENV = "APPPOT_RECORD"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _kvm_env() -> bool | None:
    value = os.environ.get("APPPOT_KVM", "")
    if value in ("", "auto"):
        return None
    if value in ("0", "1"):
        return value == "1"
    raise UsageError(f"APPPOT_KVM={value!r}: use 1 (require KVM), 0 (no KVM) or auto")


VERIFY_ENV = "APPPOT_VERIFY"


def _verify_env() -> bool:
    value = os.environ.get(VERIFY_ENV, "")
    if value not in ("", "0", "1"):
        raise UsageError(f"{VERIFY_ENV}={value!r}: use 1 (verify every image before it boots) or 0")
    return value == "1"


def cmd_start(argv: Sequence[str], prog: str = "apppot start") -> int:
    from apppot.start import start

    spec = parse_start(argv, prog)
    if spec.verbose:
        from apppot import proc

        proc.verbose = say
    return start(spec)

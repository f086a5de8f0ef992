"""Command-line entry points: `apppot` (subcommands) and `apppot-start`.

Only this package turns AppPotError into a message and an exit code: the entry points here
dispatch to one module per group of commands (start, images, submit, vm).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from apppot import __version__, hostfds
from apppot.cli.common import parser_class
from apppot.cli.start import cmd_start, parse_start
from apppot.errors import EXIT_APPPOT_ERROR, EXIT_GUEST_DIED, AppPotError, unforeseen
from apppot.say import say_stderr as say


def _run(func_argv: Sequence[str], prog: str) -> int:
    try:
        if prog == "apppot-start":
            return cmd_start(func_argv, prog)
        if func_argv[:1] == ["start"]:  # the common case, without building a parser
            return cmd_start(func_argv[1:])
        p = parser_class()(prog="apppot", description="Run whole Linux appliances as ordinary batch jobs.")
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
        # Each group's module is loaded only for its commands: `apppot start` pays for none of them.
        if ns.subcommand in ("image", "kernel", "changes"):
            from apppot.cli import images

            return {"image": images.cmd_image, "kernel": images.cmd_kernel, "changes": images.cmd_changes}[ns.subcommand](rest)
        if ns.subcommand in ("cloud-seed", "doctor"):
            from apppot.cli import vm

            return vm.cmd_cloud_seed(rest) if ns.subcommand == "cloud-seed" else vm.cmd_doctor(rest)
        from apppot.cli import submit

        others = {
            "submit": submit.cmd_submit,
            "status": submit.cmd_status,
            "fetch": submit.cmd_fetch,
            "cancel": submit.cmd_cancel,
            "clean": submit.cmd_clean,
            "testbed": submit.cmd_testbed,
        }
        return others[ns.subcommand](rest)
    except AppPotError as e:
        say(f"error: {e}")
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
    except Exception as e:  # a defect: one line saying where, as the job's record says it (apppot.record)
        say(f"error: {unforeseen(e)}")
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
            say(f"error: cannot write stdout: {getattr(e, 'strerror', None) or e}")
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


__all__ = ["EXIT_GUEST_DIED", "entry", "main", "parse_start", "start_entry", "start_main"]

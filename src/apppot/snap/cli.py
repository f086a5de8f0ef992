"""The apppot-snap command."""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from .diff import diff
from .manifest import read_manifest, scan, write_manifest
from .merge import merge
from .pack import write_changes
from .paths import (
    BASE_ID,
    BASE_MANIFEST,
    DEFAULT_CHANGES_NAME,
    DEFAULT_EXCLUDES,
    EXCLUDE_FILE,
    JOB_DIR,
    STATE_DIR,
    SnapError,
    read_excludes,
)


def cmd_base(ns: argparse.Namespace) -> int:
    started = time.monotonic()
    # Our own files first, so that the state recorded includes them.
    exclude = Path(ns.root, EXCLUDE_FILE.lstrip("/"))
    if not exclude.exists():
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text(DEFAULT_EXCLUDES)
    Path(ns.root, STATE_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    target = os.path.join(ns.root, BASE_MANIFEST.lstrip("/"))
    entries = scan(ns.root)
    old = _old_base_id(ns.root) if os.path.exists(target) else None
    if old is not None:
        # The seed warned too: changes archives made against the old base no longer merge here.
        warning = f"replacing the base state {target} (base {old[:16]}); archives made against it no longer merge here"
        print(f"apppot-snap: WARNING: {warning}", file=sys.stderr)
    manifest = write_manifest(entries, target)
    Path(ns.root, BASE_ID.lstrip("/")).write_text(manifest.id + "\n")
    took = time.monotonic() - started
    print(f"apppot-snap: base {manifest.id[:16]} recorded in {target}: {len(entries)} paths in {took:.1f} s")
    return 0


def _old_base_id(root: str) -> str:
    try:
        return Path(root, BASE_ID.lstrip("/")).read_text().strip() or "?"
    except OSError:
        return "?"


def _default_target() -> str:
    directory = JOB_DIR if os.path.isdir(JOB_DIR) else os.getcwd()
    return os.path.join(directory, DEFAULT_CHANGES_NAME.format(date=time.strftime("%Y-%m-%d")))


def cmd_changes(ns: argparse.Namespace) -> int:
    started = time.monotonic()
    base = read_manifest(os.path.join(ns.root, BASE_MANIFEST.lstrip("/")))
    now = scan(ns.root, known=None if ns.checksum else base.entries, known_since=base.epoch)
    changes = diff(base.entries, now, read_excludes(ns.root), ns.root)
    if ns.dry_run:
        for label, entries in (("add", changes.added), ("modify", changes.modified), ("attributes", changes.meta)):
            for e in entries:
                print(f"{label} {e.path}")
        for path in changes.deleted:
            print(f"delete {path}")
        return 0
    target = ns.file or _default_target()
    if os.path.exists(target) and not ns.overwrite:
        raise SnapError(f"{target} exists; give another FILE or pass --overwrite")
    info = write_changes(changes, base.id, target, ns.root, ns.verbose)
    took = time.monotonic() - started
    size = os.path.getsize(target)
    print(
        f"apppot-snap: {target}: {len(info.added)} added, {len(info.modified)} changed, {len(info.deleted)} deleted "
        f"against base {base.id[:16]}; {size} bytes in {took:.1f} s"
    )
    return 0


def cmd_manifest(ns: argparse.Namespace) -> int:
    manifest = write_manifest(scan(ns.root), ns.file)
    print(f"apppot-snap: {ns.file}: {len(manifest.entries)} paths, id {manifest.id[:16]}")
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    info = merge(ns.file, ns.root, ns.force)
    print(f"apppot-snap: merged {ns.file}: {len(info.added)} added, {len(info.modified)} changed, {len(info.deleted)} deleted")
    return 0


class _ClosedStdout(io.TextIOBase):
    """sys.stdout for a stdout closed at start: printing fails as natively, with EBADF."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(9, os.strerror(9), "stdout (closed when apppot-snap started)")


def _fill_closed_std_fds() -> None:
    """/dev/null on a closed 0, 1 or 2, so that no file opened later takes its number. (apppot.hostfds
    does this for apppot; this module carries its own, being stdlib-only in images.)"""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 1:
                sys.stdout = _ClosedStdout()
            elif fd == 2:
                sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as apppot's own (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="apppot-snap", description="A system's base state, its changes, and merging them.")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)  # for building images and for tests
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("base", help="record the whole system's state as its base")
    changes = sub.add_parser("changes", help="pack everything that differs from the base")
    changes.add_argument("file", nargs="?", help=f"the archive (default: {JOB_DIR}/{DEFAULT_CHANGES_NAME})")
    changes.add_argument("-n", "--dry-run", action="store_true", help="list what would be packed")
    changes.add_argument("-v", "--verbose", action="store_true", help="list paths as they are packed")
    changes.add_argument("--checksum", action="store_true", help="hash every file, not only those whose size or time changed")
    changes.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    manifest_p = sub.add_parser("manifest", help="write the system's current state to FILE (to compare systems)")
    manifest_p.add_argument("file")
    merge_p = sub.add_parser("merge", help="apply a changes archive to this system")
    merge_p.add_argument("file")
    merge_p.add_argument("--force", action="store_true", help="merge even onto another base")
    ns = p.parse_args(argv)
    try:
        commands = {"base": cmd_base, "changes": cmd_changes, "merge": cmd_merge, "manifest": cmd_manifest}
        return commands[ns.action](ns)
    except SnapError as e:
        print(f"apppot-snap: error: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"apppot-snap: error: {e.filename}: {e.strerror} (run it as root: sudo apppot-snap ...)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"apppot-snap: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1


def run() -> int:
    """The program: /usr/sbin/apppot-snap in images, python3 -m apppot.snap."""
    _fill_closed_std_fds()
    return main()

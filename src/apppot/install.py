"""A site install of AppPot, for every user of a host (or, under ~/.local, for one user).

PREFIX/lib/apppot holds the package, compiled, run by the system's Python (`-I`: a job's PYTHONPATH or
user site cannot change what runs); PREFIX/bin holds `apppot`, `apppot-start` and `apppot-snap`, also
linked into --bindir when given (e.g. /usr/local/bin for PREFIX=/opt/apppot). Files 0644, programs and
directories 0755, whatever the umask. PREFIX/lib/apppot is a link to one release's directory, replaced in
one rename, and a launcher resolves it once at start: a job that starts during an upgrade runs the old or
the new AppPot, never half of each. The release before stays, for jobs still running it.

    make install-site PREFIX=/opt/apppot [BINDIR=/usr/local/bin]    # as root: for every user
    make install                                                    # for yourself: ~/.local/bin/apppot
(both run: PYTHONPATH=src python3 -m apppot.install --prefix PREFIX [--bindir DIR]; when the programs'
directory is not on PATH, it says so and how to add it)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import apppot
from apppot.errors import AppPotError, HostError
from apppot.proc import run

PROGRAMS = {
    "apppot": "from apppot.cli import entry\n\nentry()\n",
    "apppot-start": "from apppot.cli import start_entry\n\nstart_entry()\n",
    "apppot-snap": 'import runpy\n\nrunpy.run_module("apppot.snap", run_name="__main__")\n',
}


SYSTEM_PYTHON = "/usr/bin/python3"


def system_python() -> str:
    """The system's Python, which every user can run (the one running this may be a user's own, e.g. under /root)."""
    return SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else sys.executable


def install(
    prefix: Path, bindir: Path | None = None, python: str | None = None, note: Callable[[str], None] = lambda line: None
) -> Path:
    """Install this AppPot (the package this code is part of) under prefix; returns PREFIX/bin/apppot.
    note() is told of what it could not tidy (an old release it cannot remove)."""
    prefix = prefix.expanduser().absolute()
    python = python or system_python()
    _check_python(python)
    package = Path(apppot.__file__).resolve().parent
    lib_parent = prefix / "lib"
    lib = lib_parent / "apppot"
    release = lib_parent / f"apppot-{apppot.__version__}-{time.time_ns()}"
    staging = lib_parent / f".{release.name}.new"
    try:
        _make_dirs(lib_parent)
        shutil.copytree(package, staging / "apppot", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        run([python, "-I", "-m", "compileall", "-q", str(staging)])  # job starts do not compile it again
        _open_to_all(staging)
        staging.rename(release)
        previous = _current_release(lib)
        _link(lib, Path(release.name))
        _remove_old_releases(lib_parent, {release.name, previous}, note)
        bin_dir = prefix / "bin"
        _make_dirs(bin_dir)
        for name, body in PROGRAMS.items():
            _write(bin_dir / name, _launcher(python, lib) + body)
            if bindir is not None and bindir.expanduser().absolute() != bin_dir:
                _link(bindir.expanduser().absolute() / name, bin_dir / name)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise HostError(f"cannot install AppPot under {prefix}: {e}; install as the owner of {prefix} (or root)") from None
    return bin_dir / "apppot"


def _launcher(python: str, lib: Path) -> str:
    # The link is resolved once, so every later import of this run comes from the same release.
    head = f"#!{python} -I\n# AppPot, installed by apppot.install\nimport os\nimport sys\n\n"
    return head + f"sys.path.insert(0, os.path.realpath({str(lib)!r}))\n"


def _current_release(lib: Path) -> str | None:
    """The release directory lib names now; an install before releases had a plain directory, kept aside."""
    if lib.is_symlink():
        return os.readlink(lib)
    if lib.is_dir():
        kept = lib.with_name(f"apppot-before-{time.time_ns()}")
        lib.rename(kept)
        return kept.name
    return None


# The names install() gives its releases (apppot-VERSION-NANOSECONDS, apppot-before-NANOSECONDS): nothing
# else under PREFIX/lib is the installer's to remove, e.g. a user's ~/.local/lib/apppot-notes.
RELEASE_NAME = re.compile(r"apppot-(?:before|\d[0-9A-Za-z.+]*)-\d{10,}")


def _remove_old_releases(lib_parent: Path, keep: set[str | None], note: Callable[[str], None]) -> None:
    for path in lib_parent.glob("apppot-*"):
        if path.name in keep or not RELEASE_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        try:
            shutil.rmtree(path)
        except OSError as e:
            note(f"cannot remove the old release {path} ({e.strerror or e}); remove it as its owner (or root)")


def _check_python(python: str) -> None:
    result = run([python, "-I", "-c", "import sys; sys.exit(sys.version_info < (3, 11))"], check=False)
    if result.returncode != 0:
        raise HostError(f"{python} cannot run AppPot, which needs Python 3.11 or newer; give another with --python")


def _make_dirs(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(parents=True)
        directory.chmod(0o755)


def _open_to_all(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)


def _link(link: Path, target: Path) -> None:
    _make_dirs(link.parent)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def path_note(bin_dir: Path, path: str) -> str | None:
    """What to do when bin_dir is not on PATH (as for ~/.local/bin on a Debian without it); None when it is."""
    if any(entry and os.path.normpath(entry) == os.path.normpath(bin_dir) for entry in path.split(os.pathsep)):
        return None
    return (
        f"note: {bin_dir} is not on your PATH, so a bare 'apppot' is not found; run {bin_dir}/apppot, or add it "
        f'to PATH (e.g. in ~/.profile): export PATH="{bin_dir}:$PATH"'
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m apppot.install", description="Install AppPot for every user of this host.")
    p.add_argument("--prefix", type=Path, required=True, help="e.g. /opt/apppot, /usr/local, ~/.local")
    p.add_argument("--bindir", type=Path, help="also link the programs here, e.g. /usr/local/bin")
    p.add_argument("--python", help=f"the Python that runs AppPot (default: {SYSTEM_PYTHON}, else this one)")
    ns = p.parse_args(argv)
    try:
        launcher = install(ns.prefix, ns.bindir, ns.python, lambda line: print(f"apppot install: note: {line}", file=sys.stderr))
    except AppPotError as e:
        print(f"apppot install: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"installed {launcher} (and apppot-start, apppot-snap beside it)")
    note = path_note(ns.bindir.expanduser().absolute() if ns.bindir else launcher.parent, os.environ.get("PATH", ""))
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

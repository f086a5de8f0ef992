"""Lock files: the exact Debian packages an appliance was built with, so that a later build installs
the same ones. Pure parsing and rendering; the builder reads and writes them beside the recipe.

A lock is UTF-8 text, one item a line, written sorted so that two locks of one state are equal:

    # comment lines and blank lines are ignored
    format: 1
    suite: bookworm
    architecture: amd64
    source-date-epoch: 1783764997
    requested: autoconf build-essential
    auto: cpp gcc-12 libgomp1
    acl=2.3.1-3
    gcc=4:12.2.0-3
    libfoo:i386=1.0-1

Header lines are `key: value`; a package line is `name[:arch]=version`, apt's own syntax (the version
may hold an epoch's colon, so the architecture goes with the name), with the architecture only for a
package of another architecture than the image's. `requested` is the recipe's own package list, so
that a lock written for other packages is recognised as out of date; `auto` names the packages apt
installed as dependencies (apt's "automatically installed" mark, which a build that names every
package would otherwise lose).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from apppot.errors import UsageError

FORMAT = 1
MAX_BYTES = 4 << 20  # a lock of a large system is some 100 KiB
_NAME = r"[a-z0-9][a-z0-9+.-]+"
_ARCH = r"[a-z0-9][a-z0-9-]*"
_VERSION = r"[A-Za-z0-9.+~:-]+"
_PACKAGE = re.compile(rf"({_NAME})(?::({_ARCH}))?=({_VERSION})")
_AUTO = re.compile(rf"{_NAME}(?::{_ARCH})?")  # these go into a shell hook: nothing else may pass
_HEADER = re.compile(r"([a-z-]+):\s*(.*)")
_KEYS = ("format", "suite", "architecture", "source-date-epoch", "requested", "auto")
_INTRO = (
    "# AppPot lock: the exact Debian packages `apppot image build` installs for the recipe beside it.\n"
    "# Written by `apppot image build --lock`; every build of the recipe uses it while it is here.\n"
    "# To move to newer packages, build with --lock again (or delete this file).\n"
)


class LockError(UsageError):
    """A lock file that cannot be used as written."""


class LockedPackage(NamedTuple):
    name: str
    version: str
    arch: str = ""  # only for a package of another architecture than the image's

    @property
    def spec(self) -> str:
        """apt's `name[:arch]=version`, as mmdebstrap's --include takes it."""
        return f"{self.name}{':' + self.arch if self.arch else ''}={self.version}"


class Lock(NamedTuple):
    suite: str
    architecture: str
    source_date_epoch: int
    requested: tuple[str, ...]  # the recipe's packages, as written in it, sorted
    auto: tuple[str, ...]  # the packages apt marked automatically installed (name[:arch]), sorted
    packages: tuple[LockedPackage, ...]  # sorted by name, then architecture

    def names(self) -> set[str]:
        return {p.name for p in self.packages}


def lock_path(recipe: Path) -> Path:
    """Where a recipe's lock lives: beside it, named like it, with .lock for .toml."""
    return recipe.with_suffix(".lock")


def make_lock(
    suite: str,
    architecture: str,
    epoch: int,
    requested: Iterable[str],
    installed: Iterable[tuple[str, str, str]],
    auto: Iterable[str] = (),
) -> Lock:
    """A lock from what dpkg reports installed, (name, version, architecture) triples, and apt's auto marks."""
    packages = {LockedPackage(name, version, "" if arch in (architecture, "all") else arch) for name, version, arch in installed}
    return Lock(suite, architecture, epoch, tuple(sorted(set(requested))), tuple(sorted(set(auto))), tuple(sorted(packages)))


def render_lock(lock: Lock) -> str:
    lines = [
        f"format: {FORMAT}",
        f"suite: {lock.suite}",
        f"architecture: {lock.architecture}",
        f"source-date-epoch: {lock.source_date_epoch}",
        f"requested: {' '.join(lock.requested)}".rstrip(),
        f"auto: {' '.join(lock.auto)}".rstrip(),
        *(p.spec for p in lock.packages),
    ]
    return _INTRO + "\n".join(lines) + "\n"


def parse_lock(text: str, path: Path) -> Lock:
    """Read a lock; every problem is a LockError naming the file and line."""
    headers: dict[str, str] = {}
    packages: dict[tuple[str, str], LockedPackage] = {}

    def fail(number: int, message: str) -> LockError:
        return LockError(f"lock {path}, line {number}: {message}; fix it, or write it afresh with apppot image build --lock")

    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line:
            match = _PACKAGE.fullmatch(line)
            if not match:
                raise fail(number, f"{line!r} is not a package line like name=version")
            name, arch, version = match.group(1), match.group(2) or "", match.group(3)
            if (name, arch) in packages:
                raise fail(number, f"package {name} is locked twice")
            packages[name, arch] = LockedPackage(name, version, arch)
            continue
        match = _HEADER.fullmatch(line)
        if not match or match.group(1) not in _KEYS:
            raise fail(number, f"{line!r} is neither a package line (name=version) nor one of {', '.join(_KEYS)}")
        if match.group(1) in headers:
            raise fail(number, f"{match.group(1)!r} is given twice")
        headers[match.group(1)] = match.group(2).strip()
    missing = [key for key in _KEYS if key not in headers]
    if missing:
        raise LockError(f"lock {path} lacks {', '.join(missing)}; write it afresh with apppot image build --lock")
    if headers["format"] != str(FORMAT):
        raise LockError(
            f"lock {path} is of format {headers['format']!r}, this AppPot reads format {FORMAT}; "
            "use the AppPot that wrote it, or write it afresh with apppot image build --lock"
        )
    if not headers["source-date-epoch"].isdigit():
        raise LockError(
            f"lock {path}: source-date-epoch {headers['source-date-epoch']!r} is not a number of seconds; "
            "write it afresh with apppot image build --lock"
        )
    if not packages:
        raise LockError(f"lock {path} names no packages; write it afresh with apppot image build --lock")
    for name in headers["auto"].split():
        if not _AUTO.fullmatch(name):
            raise LockError(
                f"lock {path}: {name!r} in auto is not a package name; write it afresh with apppot image build --lock"
            )
    return Lock(
        headers["suite"],
        headers["architecture"],
        int(headers["source-date-epoch"]),
        tuple(sorted(set(headers["requested"].split()))),
        tuple(sorted(set(headers["auto"].split()))),
        tuple(sorted(packages.values())),
    )


def read_lock(path: Path) -> Lock | None:
    """The lock at path, or None if there is none."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LockError(f"cannot read lock {path}: {e.strerror}; check its permissions, or remove it") from e
    if len(data) > MAX_BYTES:
        raise LockError(f"lock {path} is over {MAX_BYTES >> 20} MiB, no lock is; write it afresh with apppot image build --lock")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise LockError(f"lock {path} is not UTF-8 text; write it afresh with apppot image build --lock") from None
    return parse_lock(text, path)


def out_of_date(lock: Lock, suite: str, architecture: str, requested: Sequence[str], needed: Iterable[str]) -> str | None:
    """Why a lock does not fit the recipe as it is now (None: it fits). ``needed``: the package names
    the image must have (the recipe's and AppPot's own)."""
    if lock.suite != suite:
        return f"it was written for suite {lock.suite}, the recipe now asks for {suite}"
    if lock.architecture != architecture:
        return f"it was written for architecture {lock.architecture}, this host builds {architecture}"
    wanted = tuple(sorted(set(requested)))
    if lock.requested != wanted:
        added = sorted(set(wanted) - set(lock.requested))
        dropped = sorted(set(lock.requested) - set(wanted))
        changes = [f"added {' '.join(added)}"] * bool(added) + [f"removed {' '.join(dropped)}"] * bool(dropped)
        return f"the recipe's packages changed since it was written ({'; '.join(changes)})"
    lacking = sorted(set(needed) - lock.names())
    if lacking:
        return f"it lacks {' '.join(lacking)}, which the image needs"
    return None


_NOT_FOUND = re.compile(r"E: Version '([^']+)' for '([^']+)' was not found")
_NO_PACKAGE = re.compile(r"E: Unable to locate package (\S+)")


def missing_from_mirror(output: Iterable[str]) -> list[str]:
    """The locked `name=version`s (or names) apt said the mirror does not have, from its error lines."""
    found = []
    for line in output:
        if match := _NOT_FOUND.search(line):
            found.append(f"{match.group(2)}={match.group(1)}")
        elif match := _NO_PACKAGE.search(line):
            found.append(match.group(1))
    return sorted(set(found))


def auto_installed(extended_states: str, architecture: str) -> list[str]:
    """The packages apt's extended_states marks automatically installed (name, or name:arch for another
    architecture), sorted."""
    found = []
    for stanza in extended_states.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line)
        if fields.get("Auto-Installed") == "1" and "Package" in fields:
            arch = fields.get("Architecture", architecture)
            found.append(fields["Package"] + ("" if arch in (architecture, "all") else f":{arch}"))
    return sorted(set(found))

"""Appliance recipes: a TOML file that says what goes into an image. Parsing and checking only, no I/O
beyond reading the recipe, the files it names and its lock (NAME.lock beside it, apppot.images.lock).

    name = "debian-dev"
    size = "4G"
    packages = ["build-essential"]
    commands = ["echo built > /etc/motd"]
    autorun = "autorun.sh"          # or autorun_script = '''#!/bin/sh ...'''

    [base]
    distribution = "debian"
    suite = "bookworm"

    [[files]]
    source = "data/input.dat"       # relative to the recipe
    target = "/opt/app/input.dat"
    mode = "0644"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from apppot.errors import UsageError
from apppot.images.lock import Lock, lock_path, read_lock, render_lock
from apppot.spec import MIB, parse_mem

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_SUITE = re.compile(r"[a-z][a-z0-9-]*")
DEFAULT_SIZE = "4G"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DISTRIBUTIONS = ("debian",)
MIN_SIZE = 256 * MIB


class RecipeError(UsageError):
    """A recipe that cannot be built as written."""


class FileCopy(NamedTuple):
    source: Path  # on the host, resolved against the recipe's directory
    target: str  # absolute path in the image
    mode: int | None


class Base(NamedTuple):
    distribution: str
    suite: str
    mirror: str | None  # None: APPPOT_DEBIAN_MIRROR, else DEFAULT_MIRROR
    components: tuple[str, ...]


class Recipe(NamedTuple):
    path: Path
    name: str
    description: str
    size_bytes: int
    base: Base
    packages: tuple[str, ...]
    files: tuple[FileCopy, ...]
    commands: tuple[str, ...]
    autorun: str | None  # the script's text
    lock: Lock | None = None  # the lock beside the recipe (apppot.images.lock), if there is one

    def identity(self) -> dict[str, object]:
        """Everything that decides the image's content, in a form fit for hashing (file contents aside)."""
        return {
            "name": self.name,
            "size_bytes": self.size_bytes,
            "base": self.base._asdict(),
            "packages": list(self.packages),
            "files": [{"target": f.target, "mode": f.mode} for f in self.files],
            "commands": list(self.commands),
            "autorun": self.autorun,
            "lock": render_lock(self.lock) if self.lock else None,
        }


# key -> (type description, check)
_TOP = {"name", "description", "size", "packages", "commands", "autorun", "autorun_script", "base", "files"}
_BASE = {"distribution", "suite", "mirror", "components"}
_FILE = {"source", "target", "mode"}


def _line_of(text: str, table: str | None, key: str, index: int = 0) -> int | None:
    """The line (1-based) where ``key`` is set in ``table`` (None: the top level; "files": the
    index-th [[files]]), found by scanning the TOML text: tomllib does not report positions.
    A key that is not there gives the line of its table's header."""
    current: str | None = None
    seen = -1
    header_line: int | None = None
    key_line = re.compile(rf"\s*(?:{re.escape(key)}|\"{re.escape(key)}\")\s*=")
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?", line)
        if header:
            current = header.group(1)
            if current == table:
                seen += 1
                if table != "files" or seen == index:
                    header_line = number
            if key == current and table is None:
                return number
            continue
        if current == table and (table != "files" or seen == index) and key_line.match(line):
            return number
    return header_line


class _Checker:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text

    def fail(self, message: str, table: str | None, key: str, index: int = 0) -> RecipeError:
        line = _line_of(self.text, table, key, index)
        where = f"{self.path}, line {line}" if line else str(self.path)
        return RecipeError(f"recipe {where}: {message}")

    def unknown(self, data: Mapping[str, object], known: set[str], table: str | None, index: int = 0) -> None:
        for key in data:
            if key not in known:
                scope = f" in [{table}]" if table else ""
                raise self.fail(f"unknown key '{key}'{scope} (known: {', '.join(sorted(known))})", table, key, index)

    def string(self, data: Mapping[str, object], key: str, table: str | None = None, index: int = 0) -> str | None:
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(f"'{key}' must be a string, not {_kind(value)}", table, key, index)
        if value == "" and key != "description":
            raise self.fail(f"'{key}' is empty; give a value or leave the key out", table, key, index)
        return value

    def strings(self, data: Mapping[str, object], key: str, table: str | None = None) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"'{key}' must be a list of strings", table, key)
        return tuple(value)


def _kind(value: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def parse_recipe(path: Path, *, with_lock: bool = True) -> Recipe:
    """Read and check a recipe; every problem is a RecipeError naming the key and its line.

    with_lock: read its lock too (False: leave it, even a broken one, as `image build --lock` does)."""
    import tomllib

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist; give the path of a .toml recipe") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}; check its permissions") from e
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text; a recipe is a TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {path} is not valid TOML: {e}") from None
    c = _Checker(path, text)
    c.unknown(data, _TOP, None)

    name = c.string(data, "name")
    if name is None:
        raise RecipeError(f"recipe {path}: 'name' is missing; add e.g. name = \"{_suggest_name(path)}\"")
    if not NAME.fullmatch(name):
        raise c.fail(f"name {name!r} is not allowed: use lower-case letters, digits, '.', '_' and '-'", None, "name")

    size_text = c.string(data, "size") or DEFAULT_SIZE
    try:
        size = parse_mem(size_text)
    except UsageError:
        size = 0
    if size < MIN_SIZE:
        raise c.fail(f'size {size_text!r} is not a size of at least 256M, like "4G"', None, "size")

    base_data = data.get("base", {})
    if not isinstance(base_data, dict):
        raise c.fail("'base' must be a table: [base]", None, "base")
    c.unknown(base_data, _BASE, "base")
    distribution = c.string(base_data, "distribution", "base") or "debian"
    if distribution not in DISTRIBUTIONS:
        raise c.fail(
            f"distribution {distribution!r} is not supported (supported: {', '.join(DISTRIBUTIONS)})", "base", "distribution"
        )
    suite = c.string(base_data, "suite", "base") or "bookworm"
    if not _SUITE.fullmatch(suite):
        raise c.fail(f'suite {suite!r} is not a Debian suite name like "bookworm"', "base", "suite")
    mirror = c.string(base_data, "mirror", "base")
    if mirror is not None and not re.fullmatch(r"(https?|file)://\S+", mirror):
        raise c.fail(f"mirror {mirror!r} is not an http://, https:// or file:// URL", "base", "mirror")
    components = c.strings(base_data, "components", "base") or ("main",)
    for component in components:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", component):
            raise c.fail(f'component {component!r} is not a Debian archive area like "main"', "base", "components")
    base = Base(distribution, suite, mirror, components)

    packages = c.strings(data, "packages")
    for package in packages:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?", package):
            raise c.fail(f"package {package!r} is not a Debian package name", None, "packages")
    commands = c.strings(data, "commands")

    files = _files(c, data.get("files", []))

    autorun_file = c.string(data, "autorun")
    autorun_script = c.string(data, "autorun_script")
    if autorun_file is not None and autorun_script is not None:
        raise c.fail("give either 'autorun' (a file) or 'autorun_script' (its text), not both", None, "autorun_script")
    autorun = autorun_script
    if autorun_file is not None:
        source = path.parent / autorun_file
        try:
            autorun = source.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise c.fail(f"cannot read the autorun script {source}: {getattr(e, 'strerror', e)}", None, "autorun") from e

    description = c.string(data, "description") or ""
    lock = read_lock(lock_path(path)) if with_lock else None
    return Recipe(path.resolve(), name, description, size, base, packages, files, commands, autorun, lock)


def _files(c: _Checker, value: object) -> tuple[FileCopy, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise c.fail("'files' must be a list of tables: [[files]] with source and target", None, "files")
    out = []
    for i, entry in enumerate(value):
        c.unknown(entry, _FILE, "files", i)
        source_text = c.string(entry, "source", "files", i)
        target = c.string(entry, "target", "files", i)
        if source_text is None or target is None:
            raise c.fail("each [[files]] needs 'source' and 'target'", "files", "source" if source_text is None else "target", i)
        pure = PurePosixPath(target)
        if not pure.is_absolute() or ".." in pure.parts or pure == PurePosixPath("/"):
            raise c.fail(f"target {target!r} must be an absolute path in the image, without '..'", "files", "target", i)
        source = c.path.parent / source_text
        if not source.exists():
            raise c.fail(f"source {source} does not exist", "files", "source", i)
        mode_text = c.string(entry, "mode", "files", i)
        mode = None
        if mode_text is not None:
            if not re.fullmatch(r"0?[0-7]{3,4}", mode_text):
                raise c.fail(f'mode {mode_text!r} is not an octal mode like "0755"', "files", "mode", i)
            mode = int(mode_text, 8)
        out.append(FileCopy(source.resolve(), str(pure), mode))
    return tuple(out)


def _suggest_name(path: Path) -> str:
    stem = re.sub(r"[^a-z0-9._-]", "-", path.stem.lower()).strip("-.") or "my-appliance"
    return stem

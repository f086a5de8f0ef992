"""Choosing which Debian kernel source package to build AppPot's kernel from (pure: no I/O).

The rule, not a pinned file name: the newest `linux-source-X.Y` with X.Y at least
SECCOMP_MIN (the first version with UML's seccomp mode) from the suites that keep new
kernels, newest Debian revision first; if there is none, the newest one from the
machine's own suite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cmp_to_key

SECCOMP_MIN = (6, 16)
NEW_SUITES = ("trixie-backports",)
_PACKAGE = re.compile(r"linux-source-(\d+)\.(\d+)")
_NON_DIGITS = re.compile(r"\D*")
_DIGITS = re.compile(r"\d*")


@dataclass(frozen=True)
class SourcePackage:
    """One version of a `linux-source-X.Y` package in one suite."""

    name: str
    version: str
    suite: str

    @property
    def series(self) -> tuple[int, int]:
        m = _PACKAGE.fullmatch(self.name)
        assert m is not None
        return int(m[1]), int(m[2])

    @property
    def seccomp(self) -> bool:
        return self.series >= SECCOMP_MIN

    @property
    def upstream(self) -> str:
        """The kernel version without Debian's epoch and revision, e.g. 7.3.4."""
        version = self.version.split(":", 1)[-1]
        return version.rsplit("-", 1)[0]


@dataclass(frozen=True)
class Choice:
    package: SourcePackage
    fallback: bool  # no seccomp-capable source was found; this is the machine's own suite's


def parse_madison(text: str) -> list[SourcePackage]:
    """Packages from `apt-cache madison` output; lines that are not linux-source-X.Y are ignored."""
    found = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) < 3 or not _PACKAGE.fullmatch(fields[0]):
            continue
        where = fields[2].split()
        if len(where) < 2:
            continue
        suite = where[1].split("/", 1)[0]
        found.append(SourcePackage(fields[0], fields[1], suite))
    return found


def choose(packages: list[SourcePackage], own_suite: str, new_suites: tuple[str, ...] = NEW_SUITES) -> Choice | None:
    """The package to build, by the rule in this module's docstring; None if there is none."""

    def newest(candidates: list[SourcePackage]) -> SourcePackage | None:
        if not candidates:
            return None
        return max(candidates, key=cmp_to_key(_cmp_packages))

    modern = newest([p for p in packages if p.suite in new_suites and p.seccomp])
    if modern is not None:
        return Choice(modern, fallback=False)
    own = newest([p for p in packages if p.suite == own_suite])
    return Choice(own, fallback=True) if own is not None else None


def _cmp_packages(a: SourcePackage, b: SourcePackage) -> int:
    if a.series != b.series:
        return -1 if a.series < b.series else 1
    return compare_versions(a.version, b.version)


def compare_versions(a: str, b: str) -> int:
    """Debian version comparison (epoch, upstream, revision; '~' sorts before everything): -1, 0 or 1."""

    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    while a or b:
        # A non-digit run, character by character in Debian's order; then a number.
        sa, sb = _NON_DIGITS.match(a).group(), _NON_DIGITS.match(b).group()  # type: ignore[union-attr]
        for i in range(max(len(sa), len(sb))):
            ca = _order(sa[i]) if i < len(sa) else 0
            cb = _order(sb[i]) if i < len(sb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(sa) :], b[len(sb) :]
        da, db = _DIGITS.match(a).group(), _DIGITS.match(b).group()  # type: ignore[union-attr]
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        a, b = a[len(da) :], b[len(db) :]
    return 0

"""Lock files: rendering and parsing (golden), checking against the recipe, apt's complaints, and the
mmdebstrap command line of a locked recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apppot.errors import HostError
from apppot.images import debian
from apppot.images.lock import (
    Lock,
    LockedPackage,
    LockError,
    auto_installed,
    lock_path,
    make_lock,
    missing_from_mirror,
    out_of_date,
    parse_lock,
    read_lock,
    render_lock,
)
from apppot.images.recipe import parse_recipe

GOLDEN = """\
# AppPot lock: the exact Debian packages `apppot image build` installs for the recipe beside it.
# Written by `apppot image build --lock`; every build of the recipe uses it while it is here.
# To move to newer packages, build with --lock again (or delete this file).
format: 1
suite: bookworm
architecture: amd64
source-date-epoch: 1783764997
requested: file gfortran
auto: gcc libfoo:i386
file=1:5.44-3
gcc=4:12.2.0-3
gfortran=4:12.2.0-3
libfoo:i386=1.0-1
sudo=1.9.13p3-1+deb12u1
"""

INSTALLED = [
    ("sudo", "1.9.13p3-1+deb12u1", "amd64"),
    ("gfortran", "4:12.2.0-3", "amd64"),
    ("file", "1:5.44-3", "amd64"),
    ("libfoo", "1.0-1", "i386"),
    ("gcc", "4:12.2.0-3", "amd64"),
]


def test_a_lock_renders_sorted_in_apts_syntax() -> None:
    lock = make_lock("bookworm", "amd64", 1783764997, ["gfortran", "file", "gfortran"], INSTALLED, ["libfoo:i386", "gcc"])
    assert render_lock(lock) == GOLDEN


def test_a_lock_reads_back_as_written() -> None:
    lock = parse_lock(GOLDEN, Path("r.lock"))
    assert lock == make_lock("bookworm", "amd64", 1783764997, ["file", "gfortran"], INSTALLED, ["gcc", "libfoo:i386"])
    assert LockedPackage("libfoo", "1.0-1", "i386") in lock.packages
    assert [p.spec for p in lock.packages][:2] == ["file=1:5.44-3", "gcc=4:12.2.0-3"]  # an epoch's colon stays
    assert lock.names() == {"file", "gcc", "gfortran", "libfoo", "sudo"}


def test_an_architecture_independent_package_is_not_qualified() -> None:
    lock = make_lock("bookworm", "amd64", 1, [], [("tzdata", "2024a-0+deb12u1", "all")])
    assert lock.packages == (LockedPackage("tzdata", "2024a-0+deb12u1"),)


_names = st.from_regex(r"[a-z0-9][a-z0-9+.-]{1,20}", fullmatch=True)
_versions = st.from_regex(r"([0-9]:)?[0-9][A-Za-z0-9.+~-]{0,12}", fullmatch=True)


@given(
    st.lists(st.tuples(_names, _versions, st.sampled_from(["amd64", "all", "i386"])), min_size=1),
    st.lists(_names),
    st.lists(_names),
)
def test_any_lock_reads_back_as_written(installed: list[tuple[str, str, str]], requested: list[str], auto: list[str]) -> None:
    unique = list({(n, "" if a in ("amd64", "all") else a): (n, v, a) for n, v, a in installed}.values())
    lock = make_lock("trixie", "amd64", 1700000000, requested, unique, auto)
    assert parse_lock(render_lock(lock), Path("x.lock")) == lock


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOLDEN.replace("gcc=4:12.2.0-3", "gcc==4"), r"line 11: 'gcc==4' is not a package line"),
        (GOLDEN.replace("gcc=4:12.2.0-3", "gcc=4:12.2.0-3\ngcc=5"), r"line 12: package gcc is locked twice"),
        (GOLDEN.replace("suite: bookworm", "release: bookworm"), r"line 5: 'release: bookworm' is neither"),
        (GOLDEN + "suite: trixie\n", r"line 15: 'suite' is given twice"),
        (GOLDEN.replace("auto: gcc", "auto: $(reboot) gcc"), r"'\$\(reboot\)' in auto is not a package name"),
        (GOLDEN.replace("format: 1", "format: 2"), r"is of format '2', this AppPot reads format 1"),
        (GOLDEN.replace("source-date-epoch: 1783764997\n", ""), r"lacks source-date-epoch"),
        (GOLDEN.replace("source-date-epoch: 1783764997", "source-date-epoch: yesterday"), r"is not a number"),
        ("\n".join(line for line in GOLDEN.splitlines() if "=" not in line), r"names no packages"),
    ],
)
def test_a_bad_lock_names_the_line_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(LockError, match=message) as raised:
        parse_lock(text, Path("r.lock"))
    assert "apppot image build --lock" in str(raised.value) or "AppPot" in str(raised.value)


def test_the_lock_lives_beside_the_recipe(tmp_path: Path) -> None:
    assert lock_path(Path("/r/examples/debian-dev.toml")) == Path("/r/examples/debian-dev.lock")
    assert read_lock(tmp_path / "none.lock") is None
    (tmp_path / "bin.lock").write_bytes(b"\xff\xfe")
    with pytest.raises(LockError, match="not UTF-8"):
        read_lock(tmp_path / "bin.lock")
    (tmp_path / "big.lock").write_bytes(b"#" * (5 << 20))
    with pytest.raises(LockError, match="is over 4 MiB"):
        read_lock(tmp_path / "big.lock")


def test_a_lock_that_no_longer_fits_the_recipe_says_why() -> None:
    lock = parse_lock(GOLDEN, Path("r.lock"))
    assert out_of_date(lock, "bookworm", "amd64", ["gfortran", "file"], ["gcc", "sudo"]) is None
    assert "suite bookworm" in (out_of_date(lock, "trixie", "amd64", ["file", "gfortran"], []) or "")
    assert "architecture amd64" in (out_of_date(lock, "bookworm", "arm64", ["file", "gfortran"], []) or "")
    why = out_of_date(lock, "bookworm", "amd64", ["file", "make"], [])
    assert why == "the recipe's packages changed since it was written (added make; removed gfortran)"
    assert out_of_date(lock, "bookworm", "amd64", ["file", "gfortran"], ["mawk"]) == "it lacks mawk, which the image needs"


def test_apts_complaints_name_the_missing_versions() -> None:
    output = [
        "E: Version '2.36-9+deb12u1' for 'libc6' was not found",
        "E: Version '1:5.44-3' for 'file' was not found",
        "E: Unable to locate package gone",
        "E: mmdebstrap failed",
        "I: something else",
    ]
    assert missing_from_mirror(output) == ["file=1:5.44-3", "gone", "libc6=2.36-9+deb12u1"]
    assert missing_from_mirror(["E: apt-get update failed"]) == []


def test_a_recipe_with_a_lock_installs_the_locked_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPPOT_DEBIAN_MIRROR", raising=False)
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\npackages = ["gfortran", "file"]\n')
    unlocked = parse_recipe(path)
    assert unlocked.lock is None
    (tmp_path / "r.lock").write_text(GOLDEN)
    locked = parse_recipe(path)
    assert locked.lock == parse_lock(GOLDEN, Path("r.lock"))
    assert debian.mmdebstrap_argv(locked, Path("/s"), Path("/r")) == [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        "--verbose",
        "--include=file=1:5.44-3,gcc=4:12.2.0-3,gfortran=4:12.2.0-3,libfoo:i386=1.0-1,sudo=1.9.13p3-1+deb12u1",
        "--components=main",
        '--customize-hook=chroot "$1" apt-mark auto gcc libfoo:i386',
        "--customize-hook=sync-in /s /",
        "bookworm",
        "/r",
        "http://deb.debian.org/debian",
    ]
    # The lock is part of what the image is named by.
    assert debian.recipe_id(locked) != debian.recipe_id(unlocked)
    (tmp_path / "r.lock").write_text(GOLDEN.replace("gcc=4:12.2.0-3", "gcc=4:12.2.0-4"))
    assert debian.recipe_id(parse_recipe(path)) not in (debian.recipe_id(locked), debian.recipe_id(unlocked))


def test_a_broken_lock_stops_the_recipe_from_parsing(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n')
    (tmp_path / "r.lock").write_text("format: 1\n")
    with pytest.raises(LockError, match=r"r\.lock lacks suite"):
        parse_recipe(path)
    assert parse_recipe(path, with_lock=False).lock is None  # what `image build --lock` reads: it replaces the lock


def test_lock_fields_are_what_a_lock_holds() -> None:
    assert Lock._fields == ("suite", "architecture", "source_date_epoch", "requested", "auto", "packages")


def test_apts_automatic_marks_are_read_from_extended_states() -> None:
    states = (
        "Package: libgomp1\nArchitecture: amd64\nAuto-Installed: 1\n\n"
        "Package: make\nArchitecture: amd64\nAuto-Installed: 0\n\n"
        "Package: libfoo\nArchitecture: i386\nAuto-Installed: 1\n\n"
        "Package: cpp\nArchitecture: amd64\nAuto-Installed: 1\n"
    )
    assert auto_installed(states, "amd64") == ["cpp", "libfoo:i386", "libgomp1"]
    assert auto_installed("", "amd64") == []


def test_a_lock_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "r.toml"
    path.parent.mkdir()
    path.write_text('name = "x"\n')
    recipe = parse_recipe(path)
    lock = parse_lock(GOLDEN, Path("r.lock"))
    assert debian._write_lock(recipe, lock) == tmp_path / "gone" / "r.lock"
    assert read_lock(tmp_path / "gone" / "r.lock") == lock
    for left in path.parent.iterdir():
        left.unlink()
    path.parent.rmdir()  # the recipe's directory went away during the build
    with pytest.raises(HostError, match=r"the image is built, but its lock .*r\.lock cannot be written: .*--lock again"):
        debian._write_lock(recipe, lock)

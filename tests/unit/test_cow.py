"""COW headers: the layout UML uses, and the checks against a base image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apppot import cow
from apppot.errors import CowError


def test_header_round_trip() -> None:
    data = cow.render_header("/apppot/base/abc.img", 1_795_561_620, 16 << 20)
    header = cow.parse_header(data)
    assert header == cow.CowHeader("/apppot/base/abc.img", 1_795_561_620, 16 << 20, 512, 4096)
    assert header.base_uuid == "abc"


def test_header_bytes_match_what_uml_writes() -> None:
    # The first 48 bytes of a COW that UML 6.1 itself created for a 16 MiB base.
    uml = bytes.fromhex("4f4f4f4d000000036b06189400000000010000000000020000001000000000002f746d702f6578702f696d672e657874")
    ours = cow.render_header("/tmp/exp/img.ext4", 0x6B061894, 16 << 20)
    assert ours[:48] == uml


def test_data_offset_matches_uml() -> None:
    # UML made a 16 MiB base's COW 16 MiB + 12288 bytes long.
    assert cow.data_offset(16 << 20) == 12288


def test_not_a_cow() -> None:
    assert cow.parse_header(b"\0" * 8192) is None


def make_base(path: Path, size: int = 1 << 20) -> Path:
    path.write_bytes(b"\0" * size)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    return path


def test_create_then_check(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    c = tmp_path / "job.cow"
    cow.create(c, base, "uuid-1")
    assert c.stat().st_size == cow.data_offset(1 << 20) + (1 << 20)
    cow.check_matches(c, base, "uuid-1")
    cow.check_unlocked(c)


def test_create_never_overwrites(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    precious = tmp_path / "precious"
    precious.write_text("mine")
    with pytest.raises(CowError):
        cow.create(precious, base, "uuid-1")
    assert precious.read_text() == "mine"


def test_other_image_is_refused(tmp_path: Path) -> None:
    # Same size and mtime (every tiny image has them), another file.
    base = make_base(tmp_path / "base.img")
    other = make_base(tmp_path / "other.img")
    c = tmp_path / "job.cow"
    cow.create(c, base, "uuid-1")
    with pytest.raises(CowError, match=r"another image \(filesystem uuid-1, not uuid-2\)"):
        cow.check_matches(c, other, "uuid-2")
    with pytest.raises(CowError, match=r"another copy of this image.*ino"):
        cow.check_matches(c, other, "uuid-1")


def test_a_legacy_cow_is_checked_by_its_header(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    c = tmp_path / "job.cow"
    st = base.stat()
    c.write_bytes(cow.render_header(cow.base_path_for("uuid-1"), int(st.st_mtime), st.st_size).ljust(8192, b"\0"))
    cow.check_matches(c, base, "uuid-1")
    with pytest.raises(CowError, match="another image"):
        cow.check_matches(c, base, "uuid-2")
    os.utime(base, (1_700_000_001, 1_700_000_001))
    with pytest.raises(CowError, match="different or modified base"):
        cow.check_matches(c, base, "uuid-1")


def test_a_change_put_back_is_still_refused(tmp_path: Path) -> None:
    # UML compares size and whole-second mtime: a change within the second, or with the mtime put back, passed.
    base = make_base(tmp_path / "base.img")
    c = tmp_path / "job.cow"
    cow.create(c, base, "uuid-1")
    with base.open("r+b") as f:
        f.write(b"changed")
    os.utime(base, (1_700_000_000, 1_700_000_000))
    with pytest.raises(CowError, match="ctime_ns differ"):
        cow.check_matches(c, base, "uuid-1")


def test_the_record_survives_uml_rewriting_the_header(tmp_path: Path) -> None:
    # UML writes only its header struct when it switches the backing path: the padding keeps the record.
    base = make_base(tmp_path / "base.img")
    c = tmp_path / "job.cow"
    cow.create(c, base, "uuid-1")
    st = base.stat()
    with c.open("r+b") as f:
        f.write(cow.render_header("/elsewhere/base.img", int(st.st_mtime), st.st_size))
    cow.check_matches(c, base, "uuid-1")


def test_the_base_path_is_the_same_with_and_without_the_sandbox(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    assert cow.uml_base_path(base, "u") == str(base.resolve())
    odd = make_base(tmp_path / "with, comma.img")
    assert cow.uml_base_path(odd, "u") == cow.base_path_for("u")


def test_new_cows_are_private(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    cow.create(tmp_path / "job.cow", base, "uuid-1")
    assert (tmp_path / "job.cow").stat().st_mode & 0o777 == 0o600


def test_modified_base_is_refused(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    c = tmp_path / "job.cow"
    cow.create(c, base, "uuid-1")
    os.utime(base, (1_700_000_001, 1_700_000_001))
    with pytest.raises(CowError, match="before it changed"):
        cow.check_matches(c, base, "uuid-1")


def test_file_that_is_not_a_cow_is_refused(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    with pytest.raises(CowError, match="not a UML copy-on-write file"):
        cow.check_matches(base, base, "uuid-1")

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
    base = make_base(tmp_path / "base.img")
    c = tmp_path / "job.cow"
    cow.create(c, base, "uuid-1")
    with pytest.raises(CowError, match="another image"):
        cow.check_matches(c, base, "uuid-2")


def test_modified_base_is_refused(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    c = tmp_path / "job.cow"
    cow.create(c, base, "uuid-1")
    os.utime(base, (1_700_000_001, 1_700_000_001))
    with pytest.raises(CowError, match="different or modified base"):
        cow.check_matches(c, base, "uuid-1")


def test_file_that_is_not_a_cow_is_refused(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    with pytest.raises(CowError, match="not a UML copy-on-write file"):
        cow.check_matches(base, base, "uuid-1")

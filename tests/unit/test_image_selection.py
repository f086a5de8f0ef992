"""Which image `--image` names (sha256:PREFIX among the stored ones) and whether it is verified before the boot."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apppot.cli.start import split_seed_image
from apppot.errors import ImageError, UsageError
from apppot.images import selection, tiny, verify
from apppot.images.selection import ChosenImage, ImageSource, id_prefix, needs_verification, pick_by_prefix
from apppot.images.store import ImageRecord, StoredImage
from apppot.sandbox import Bind, bwrap_argv


def stored(name: str, content_id: str, where: str = "/cache") -> StoredImage:
    record = ImageRecord(name, "r.toml", "0" * 64, content_id, "0" * 64, 1, "debian", "bookworm", [], 1, "", 0.0)
    return StoredImage(Path(f"{where}/{name}.img"), record)


A = "ab12cd34" + "0" * 56
B = "ab12cd34" + "f" * 56
C = "99" * 32


@pytest.mark.parametrize(
    ("source", "asked", "verified"),
    [
        (ImageSource.NAME, False, True),
        (ImageSource.CONTENT_ID, False, True),
        (ImageSource.PATH, False, False),
        (ImageSource.DEFAULT, False, False),
        (ImageSource.PATH, True, True),
        (ImageSource.DEFAULT, True, True),
        (ImageSource.NAME, True, True),
    ],
)
def test_what_is_verified(source: ImageSource, asked: bool, verified: bool) -> None:
    assert needs_verification(source, asked) is verified


def test_id_prefix() -> None:
    assert id_prefix("debian-dev") is None and id_prefix("./sha256:x") is None
    assert id_prefix("sha256:AB12CD34") == "ab12cd34"  # as pasted from anywhere: case does not matter
    assert id_prefix("sha256:" + A) == A
    for bad in ("sha256:", "sha256:ab12cd3", "sha256:ab12cd3g", "sha256:" + A + "0", "sha256: ab12cd34"):
        with pytest.raises(UsageError, match="8 to 64 hex digits"):
            id_prefix(bad)


def test_pick_by_prefix() -> None:
    a, b, c = stored("a", A), stored("b", B), stored("c", C)
    assert pick_by_prefix("ab12cd340", [(A, a), (B, b), (C, c)]) is a
    assert pick_by_prefix("99999999", [(A, a), (B, b), (C, c)]) is c
    several = r"names several images: sha256:ab12cd3400000000 \(a, /cache/a.img\), sha256:ab12cd34ffff"
    with pytest.raises(ImageError, match=several):
        pick_by_prefix("ab12cd34", [(A, a), (B, b), (C, c)])
    with pytest.raises(ImageError, match="no image with content id sha256:12345678"):
        pick_by_prefix("12345678", [(A, a), (B, b)])


def test_copies_of_one_content_are_one_image_the_first_in_search_order() -> None:
    mine, published = stored("a", A), stored("a", A, "/var/lib/apppot/images")
    assert pick_by_prefix("ab12cd34", [(A, mine), (A, published)]) is mine


@given(st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=6, unique=True))
def test_a_whole_id_always_picks_its_image(contents: list[bytes]) -> None:
    images = [(hashlib.sha256(c).hexdigest(), stored(str(i), hashlib.sha256(c).hexdigest())) for i, c in enumerate(contents)]
    for content_id, image in images:
        assert pick_by_prefix(content_id, images) is image


def test_the_seeds_apppot_option_takes_a_content_id_whole() -> None:
    assert split_seed_image("sha256:ab12cd34") == (None, "sha256:ab12cd34")
    assert split_seed_image("job.cow,sha256:ab12cd34") == (Path("job.cow"), "sha256:ab12cd34")


def test_the_checked_image_is_bound_by_its_descriptor() -> None:
    argv = bwrap_argv("bwrap", [Bind("/cache/a.img", "/base/a.img", fd=7), Bind("/k", "/apppot/linux")])
    assert argv[argv.index("--ro-bind-fd") : argv.index("--ro-bind-fd") + 3] == ["--ro-bind-fd", "7", "/base/a.img"]
    assert "/cache/a.img" not in argv


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("APPPOT_IMAGE_PATH", "")
    monkeypatch.setattr(verify, "SETTLED_NS", 0)
    return tmp_path


def test_a_path_is_verified_against_the_record_beside_it(own_cache: Path) -> None:
    image = own_cache / "x.img"
    image.write_bytes(b"image bytes")
    record = stored("x", hashlib.sha256(b"image bytes").hexdigest())._replace(path=image).record
    assert record is not None
    image.with_suffix(".json").write_text(json.dumps(record._asdict()))
    chosen = ChosenImage(image, ImageSource.PATH)
    assert selection.open_verified(chosen, asked=False) is None
    fd = selection.open_verified(chosen, asked=True)
    assert fd is not None and os.fstat(fd).st_ino == image.stat().st_ino
    os.close(fd)
    image.write_bytes(b"other bytes")
    with pytest.raises(ImageError, match="was changed after it was built"):
        selection.open_verified(chosen, asked=True)


def test_a_record_beside_that_is_a_fifo_or_missing_is_none(own_cache: Path) -> None:
    image = own_cache / "x.img"
    image.write_bytes(b"image bytes")
    os.mkfifo(image.with_suffix(".json"))
    with pytest.raises(ImageError, match="has no record to verify it against"):
        selection.open_verified(ChosenImage(image, ImageSource.PATH), asked=True)


def test_the_tiny_appliances_id_file(own_cache: Path) -> None:
    image = own_cache / "tiny-0123.img"
    image.write_bytes(b"tiny")
    assert tiny.built_id(image) is None
    digest = hashlib.sha256(b"tiny").hexdigest()
    image.with_suffix(".sha256").write_text(f"{digest}  tiny-0123.img\n")
    assert tiny.built_id(image) == digest
    image.with_suffix(".sha256").write_text(f"{digest}  tiny-other.img\n")  # another image's
    assert tiny.built_id(image) is None
    with pytest.raises(ImageError, match=r"the tiny appliance .* has no record of its content id"):
        selection.expected_content_id(ChosenImage(image, ImageSource.DEFAULT))


def test_an_image_swapped_under_its_name_after_the_check_is_refused(own_cache: Path) -> None:
    image = own_cache / "x.img"
    image.write_bytes(b"checked")
    fd = verify.open_checked(image, hashlib.sha256(b"checked").hexdigest())
    try:
        verify.check_still_named(fd, image)
        swapped = own_cache / "y.img"
        swapped.write_bytes(b"checked")
        swapped.replace(image)
        with pytest.raises(ImageError, match="was replaced or changed after its content id was checked"):
            verify.check_still_named(fd, image)
    finally:
        os.close(fd)


def test_a_fifo_in_the_images_place_does_not_hang(own_cache: Path) -> None:
    fifo = own_cache / "x.img"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        verify.check_content(fifo, "0" * 64)


def test_the_content_id_of_a_fifo_is_an_error_not_a_hang(own_cache: Path) -> None:
    import signal

    fifo = own_cache / "x.img"
    os.mkfifo(fifo)

    def hung(_signum: int, _frame: object) -> None:
        raise AssertionError("content_id blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        with pytest.raises(OSError, match="not a regular file"):
            verify.content_id(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)

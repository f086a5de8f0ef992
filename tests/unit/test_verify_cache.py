"""The content-id cache: a changed file is hashed again, an unchanged one is not."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from apppot.images import verify


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(verify, "SETTLED_NS", 0)  # these files were all made just now


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors hashed from now on."""
    calls: list[int] = []
    real = verify._hash_open_file

    def counted(fd: int) -> str:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(verify, "_hash_open_file", counted)
    return calls


def test_id_is_sha256_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(b"x" * 3_000_000)
    assert verify.content_id(image) == hashlib.sha256(image.read_bytes()).hexdigest()
    calls = count_hashing(monkeypatch)
    verify.content_id(image)
    assert calls == []


def test_changed_file_with_its_times_put_back_is_hashed_again(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(b"a" * 4096)
    first = verify.content_id(image)
    st = image.stat()
    time.sleep(0.02)  # the next clock tick: a change within the same one is what SETTLED_NS is for
    with image.open("r+b") as f:
        f.write(b"b")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    assert verify.content_id(image) != first
    assert verify.content_id(image) == hashlib.sha256(image.read_bytes()).hexdigest()


def test_file_changed_just_now_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two changes within one clock tick keep ctime; a fresh file is therefore hashed every time."""
    image = tmp_path / "a.img"
    image.write_bytes(b"fresh")
    monkeypatch.setattr(verify, "SETTLED_NS", 10**12)
    verify.content_id(image)
    calls = count_hashing(monkeypatch)
    verify.content_id(image)
    assert calls


def test_changed_image_is_refused_naming_both_ids(tmp_path: Path) -> None:
    from apppot.errors import ImageError

    image = tmp_path / "a.img"
    image.write_bytes(b"built")
    good = hashlib.sha256(b"built").hexdigest()
    assert verify.check_content(image, good) == good
    time.sleep(0.02)
    image.write_bytes(b"changed")
    with pytest.raises(ImageError, match=f"{good[:16]}.*{hashlib.sha256(b'changed').hexdigest()[:16]}"):
        verify.check_content(image, good)


def _plant(image: Path, digest: str, owner: int | None = None) -> None:
    """Write the cache entry content_id would read for image, saying digest (as poison.py in the review did)."""
    import json
    import zlib

    from apppot.images.store import cache_dir

    st = image.stat()
    key = "\0".join(verify._identity(st))
    entry = cache_dir() / "host" / f"{verify.CACHE_KIND}-{zlib.crc32(key.encode()):08x}.json"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(json.dumps({"key": key, "value": {"sha256": digest}}))
    if owner is not None:  # the cache is that user's: root using it, as `sudo env XDG_CACHE_HOME=...`
        for path in (entry, entry.parent, entry.parent.parent):
            os.chown(path, owner, owner)


def test_an_entry_someone_else_wrote_decides_nothing(tmp_path: Path) -> None:
    """Another user's cache used by root (or any entry not written by this uid): the file is hashed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make an entry another user owns")
    image = tmp_path / "a.img"
    image.write_bytes(b"evil")
    _plant(image, hashlib.sha256(b"signed").hexdigest(), owner=65534)
    assert verify.content_id(image) == hashlib.sha256(b"evil").hexdigest()


@pytest.mark.parametrize("digest", ["Z" * 64, "A" * 64, "a" * 63, " " + "a" * 63])
def test_an_entry_that_is_no_digest_decides_nothing(tmp_path: Path, digest: str) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(b"evil")
    _plant(image, digest)
    assert verify.content_id(image) == hashlib.sha256(b"evil").hexdigest()

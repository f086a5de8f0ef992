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

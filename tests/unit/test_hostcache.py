"""The host cache's records are hostile input when root uses a user's cache (`sudo env
XDG_CACHE_HOME=$HOME/.cache apppot ...`): a planted link, FIFO, device or huge file is no record, never
a write through a link, a hang or a traceback."""

from __future__ import annotations

import json
import os
import signal
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from apppot import guest_kernel
from apppot.errors import HostError
from apppot.hostcache import cached
from apppot.kernel import KernelRecord

USER = (1001, 1001)
OTHER_USER = (1002, 1002)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of its own; under root, a user's (XDG_CACHE_HOME in a home root does not own)."""
    home = tmp_path / "home"
    home.mkdir()
    if os.geteuid() == 0:
        os.chown(home, *USER)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    return home / ".cache" / "apppot"


class Hung(Exception):
    """Not an OSError, which the cache's readers rightly take for no record."""


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A read that blocks (a FIFO) fails the test instead of hanging it."""

    def hung(signum: int, frame: object) -> None:
        raise Hung("the host cache blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def record_path(cache: Path, kind: str, key: list[str]) -> Path:
    return cache / "host" / f"{kind}-{zlib.crc32(chr(0).join(key).encode()):08x}.json"


def host_dir(cache: Path) -> Path:
    host = cache / "host"
    host.mkdir(parents=True)
    if os.geteuid() == 0:
        for made in (cache.parent, cache, host):
            os.chown(made, *USER)
    return host


def test_a_planted_link_at_the_temporary_name_is_not_written_through(cache: Path, tmp_path: Path) -> None:
    host_dir(cache)
    victim = tmp_path / "victim"
    victim.write_text("root's own\n")
    victim.chmod(0o600)
    record = record_path(cache, "said", ["h", "m"])
    record.with_suffix(f".{os.getpid()}.tmp").symlink_to(victim)  # the name a record was written under
    assert cached("said", ["h", "m"], lambda: {"said": True}) == {"said": True}
    assert victim.read_text() == "root's own\n"
    if os.geteuid() == 0:  # root keeps no records in a user's cache
        assert not record.exists()
        return
    assert record.is_file() and not record.is_symlink()
    assert json.loads(record.read_text())["value"] == {"said": True}


@pytest.mark.parametrize("plant", ["fifo", "dev-zero", "link", "directory"])
def test_a_record_that_is_no_regular_file_is_no_record(cache: Path, tmp_path: Path, plant: str) -> None:
    host_dir(cache)
    record = record_path(cache, "said", ["h", "m"])
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"key": "h\0m", "value": {"said": "from a link"}}))
    if plant == "fifo":
        os.mkfifo(record)
    elif plant == "dev-zero":
        record.symlink_to("/dev/zero")
    elif plant == "link":
        record.symlink_to(elsewhere)
    else:
        record.mkdir()
    assert cached("said", ["h", "m"], lambda: {"said": True}) == {"said": True}


def test_a_huge_record_is_not_read(cache: Path) -> None:
    host_dir(cache)
    record = record_path(cache, "said", ["h", "m"])
    record.write_text(json.dumps({"key": "h\0m", "value": {"said": "huge"}}) + " " * (1 << 20))
    assert cached("said", ["h", "m"], lambda: {"said": True}) == {"said": True}


def test_a_good_record_is_used(cache: Path) -> None:
    cache.mkdir(parents=True)  # the caller's own cache (root's, under root)
    assert cached("said", ["h", "m"], lambda: {"said": True}) == {"said": True}
    assert cached("said", ["h", "m"], lambda: {"said": False}) == {"said": True}


def test_root_trusts_no_record_of_a_third_user(cache: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root makes files for another user")
    host_dir(cache)
    record = record_path(cache, "said", ["h", "m"])
    record.write_text(json.dumps({"key": "h\0m", "value": {"said": "a third user's"}}))
    os.chown(record, *OTHER_USER)
    assert cached("said", ["h", "m"], lambda: {"said": True}) == {"said": True}


def test_root_keeps_no_record_in_a_users_cache(cache: Path) -> None:
    """The user could swap a directory on the way for a link between any check and root's write."""
    if os.geteuid() != 0:
        pytest.skip("only root uses another user's cache")
    cache.parent.mkdir()
    os.chown(cache.parent, *USER)
    assert cached("said", ["h", "m"], lambda: {"said": True}) == {"said": True}
    assert not record_path(cache, "said", ["h", "m"]).exists()
    assert cached("said", ["h", "m"], lambda: {"said": False}) == {"said": False}  # computed again


def test_root_refuses_the_guest_kernel_of_a_users_cache(cache: Path) -> None:
    """Its module list and files would make root copy any file it can read into the user's initramfs."""
    if os.geteuid() != 0:
        pytest.skip("only root uses another user's cache")
    (cache / "guest-kernel").mkdir(parents=True)
    os.chown(cache / "guest-kernel", *USER)
    with pytest.raises(HostError, match="root does not use the guest kernel in another user's cache"):
        guest_kernel.find(lambda _: None)


@pytest.mark.parametrize("plant", ["fifo", "dev-zero"])
def test_the_guest_kernel_pointer_and_record_are_checked_too(cache: Path, plant: str) -> None:
    root = cache / "guest-kernel"
    (root / "k").mkdir(parents=True)
    (root / "k" / "vmlinuz").write_bytes(b"")

    def put(path: Path) -> None:
        if plant == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")

    put(root / "current")
    assert guest_kernel.installed() is None
    (root / "current").unlink()
    (root / "current").write_text("k\n")
    put(root / "k" / "kernel.json")
    assert guest_kernel.installed() is None


def test_the_guest_kernel_pointer_is_written_without_following_a_planted_link(cache: Path, tmp_path: Path) -> None:
    root = cache / "guest-kernel"
    root.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("root's own\n")
    (root / f".current.{os.getpid()}").symlink_to(victim)
    guest_kernel.point_current(root, "k")
    assert victim.read_text() == "root's own\n"
    assert (root / "current").read_text() == "k\n" and not (root / "current").is_symlink()


def test_a_kernel_record_that_is_a_fifo_is_no_record(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "kernel.json")
    assert KernelRecord.read(tmp_path / "linux") is None

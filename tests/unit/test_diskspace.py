"""Free space for the guest's disk: the headroom, the refusal before the boot, the kernel's lines found after it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apppot import diskspace
from apppot.diskspace import MIB, Place
from apppot.errors import DiskSpaceError

UML_FULL = b"critical space allocation error, dev ubda, sector 66024 op 0x1:(WRITE) flags 0x4000 phys_seg 8 prio class 2"
QEMU_FULL = b"[    6.369612] I/O error, dev vda, sector 62632 op 0x1:(WRITE) flags 0x4000 phys_seg 1 prio class 2"
BUFFER = b"Buffer I/O error on device ubda, logical block 7189"


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("4096", 4096), ("64K", 64 << 10), ("256M", 256 * MIB), ("2g", 2 << 30), ("1T", 1 << 40), (" 8MiB ", 8 * MIB)],
)
def test_sizes(text: str, size: int) -> None:
    assert diskspace.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "lots", "12X", "1 G"])
def test_a_bad_size_is_one_line_naming_the_variable(text: str) -> None:
    with pytest.raises(DiskSpaceError, match="APPPOT_MIN_FREE") as e:
        diskspace.parse_size(text)
    assert "\n" not in str(e.value)


def test_the_headroom_is_what_the_disk_can_still_grow_by_at_most_the_cap() -> None:
    assert diskspace.headroom(64 * MIB) == 64 * MIB  # the tiny image: the whole image
    assert diskspace.headroom(64 * MIB, allocated=60 * MIB) == 4 * MIB  # a COW mostly written already
    assert diskspace.headroom(64 * MIB, allocated=80 * MIB) == 0
    assert diskspace.headroom(8 << 30) == diskspace.HEADROOM_CAP  # a large image: 256 MiB


def console(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "console.log"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("line", [UML_FULL, QEMU_FULL, BUFFER])
def test_the_kernels_lines_about_its_root_disk_are_found(tmp_path: Path, line: bytes) -> None:
    log = console(tmp_path, b"boot chatter\n" * 100 + line + b"\nmore\n")
    found = diskspace.find_disk_error(log)
    assert found is not None and found in line.decode()


def test_a_line_across_a_read_boundary_is_found(tmp_path: Path) -> None:
    log = console(tmp_path, b"x" * ((1 << 20) - 20) + b"\n" + UML_FULL + b"\n")
    assert diskspace.find_disk_error(log) == UML_FULL.decode()


@pytest.mark.parametrize(
    "text",
    [
        b"apppot-agent: running: I/O error, dev ubda\n",  # a job's command line is no kernel line
        b"[    1.000000] apppot-agent: running: error, dev ubda\n",
        b"x I/O error, dev ubda\n",
        b"",
        b"all fine\n",
        b"I/O error, dev ubdb, sector 1\n",
        b"I/O error, dev vdab\n",
        b"error dev ubda\n",
        b"\xff" * 5000,
    ],
)
def test_other_lines_are_not_taken_for_a_disk_error(tmp_path: Path, text: bytes) -> None:
    assert diskspace.find_disk_error(console(tmp_path, text)) is None


def test_what_the_guest_wrote_on_the_line_is_cleaned_and_capped(tmp_path: Path) -> None:
    hostile = b"\x1b[2J\x07" + b"A" * 10_000 + b"\nI/O error, dev ubda\x1b]0;pwned\x07" + b"B" * 10_000
    found = diskspace.find_disk_error(console(tmp_path, hostile))
    assert found is not None and len(found) < 300 and "\x1b" not in found and "\x07" not in found


def test_a_console_log_replaced_by_a_link_is_not_followed(tmp_path: Path) -> None:
    target = console(tmp_path, UML_FULL)
    (tmp_path / "link.log").symlink_to(target)
    assert diskspace.find_disk_error(tmp_path / "link.log") is None


def test_a_console_log_that_is_a_pipe_or_a_device_is_not_read_back(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.log")  # no writer: reading it would block for ever
    assert diskspace.find_disk_error(tmp_path / "fifo.log") is None
    assert diskspace.find_disk_error(Path("/dev/zero")) is None


def test_the_filesystem_of_a_path_that_does_not_exist_yet_is_its_parents(tmp_path: Path) -> None:
    fs = diskspace.filesystem_of(tmp_path / "new" / "mine.cow")
    assert tmp_path.resolve().is_relative_to(fs.mount_point) and fs.fstype != "unknown"
    assert diskspace.filesystem_of(Path("/proc/self")).fstype == "proc"


def test_too_little_room_is_refused_on_one_line_naming_the_filesystem(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(diskspace.MIN_FREE_ENV, raising=False)
    free = diskspace.free_bytes(tmp_path)
    place = Place(tmp_path / "mine.cow", "the COW", "put --cow on a larger filesystem", free + (1 << 40))
    with pytest.raises(DiskSpaceError) as e:
        diskspace.check_room([place])
    message = str(e.value)
    assert "\n" not in message and diskspace.filesystem_of(tmp_path).mount_point in message
    assert "the COW: " in message and "put --cow on a larger filesystem" in message and "APPPOT_MIN_FREE" in message
    monkeypatch.setenv(diskspace.MIN_FREE_ENV, "0")  # lowered on purpose
    diskspace.check_room([place])
    monkeypatch.setenv(diskspace.MIN_FREE_ENV, str(free + (1 << 40)))
    with pytest.raises(DiskSpaceError):
        diskspace.check_room([place._replace(need=0)])


def test_places_on_one_filesystem_need_their_sum(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(diskspace.MIN_FREE_ENV, raising=False)
    half = diskspace.free_bytes(tmp_path) // 2 + MIB
    places = [Place(tmp_path / "a", "the COW", "fix", half), Place(tmp_path / "b", "TMPDIR", "fix", half)]
    diskspace.check_room(places[:1])
    with pytest.raises(DiskSpaceError):
        diskspace.check_room(places)


def test_the_verdict_names_the_disk_and_the_kernels_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(diskspace.MIN_FREE_ENV, "0")
    disk = Place(tmp_path / "mine.cow", "the COW", "put --cow on a larger filesystem", 0)
    watch = diskspace.DiskWatch(disk, [])
    assert watch.verdict(console(tmp_path, b"all fine\n"), 0) is None
    failure = watch.verdict(console(tmp_path, b"ok\n" + UML_FULL + b"\n"), 0)
    assert failure is not None and failure.exit_code == 125
    message = str(failure)
    assert "\n" not in message and str(disk.path) in message and "critical space allocation error" in message
    assert "job's own status was 0" in message and os.fspath(tmp_path / "console.log") in message

"""The channel's host-side helpers, handed what a hostile guest can leave in the report directory."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from apppot.channel import Channel, ChannelClosed
from apppot.errors import GuestMisbehaved
from apppot.protocol import REPORT_LIMIT


@pytest.fixture
def channel(tmp_path: Path):
    ch = Channel(tmp_path)
    yield ch
    ch.close()


@pytest.fixture
def canary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("host") / "precious.txt"
    path.write_bytes(b"precious\n")
    return path


def test_both_directories_are_private(channel: Channel) -> None:
    for path in (channel.ctl, channel.out):
        assert path.stat().st_mode & 0o777 == 0o700


def test_a_report_is_read_whole(channel: Channel) -> None:
    assert channel.read_report("status") is None and not channel.has_report("status")
    (channel.out / "status").write_bytes(b"7\n")
    assert channel.has_report("status")
    assert channel.read_report("status") == b"7\n"


def test_a_link_is_never_followed(channel: Channel, canary: Path) -> None:
    (channel.out / "status").symlink_to(canary)
    assert channel.has_report("status")
    with pytest.raises(GuestMisbehaved, match="symbolic link as status"):
        channel.read_report("status")


def test_a_link_to_dev_zero_is_not_read(channel: Channel) -> None:
    (channel.out / "status").symlink_to("/dev/zero")
    with pytest.raises(GuestMisbehaved, match="symbolic link"):
        channel.read_report("status")


def test_a_fifo_does_not_block(channel: Channel) -> None:
    os.mkfifo(channel.out / "status")
    started = time.monotonic()
    with pytest.raises(GuestMisbehaved, match="named pipe as status"):
        channel.read_report("status")
    assert time.monotonic() - started < 1


def test_a_directory_is_refused(channel: Channel) -> None:
    (channel.out / "status").mkdir()
    with pytest.raises(GuestMisbehaved, match="directory as status"):
        channel.read_report("status")


def test_a_huge_file_is_not_read(channel: Channel) -> None:
    with (channel.out / "status").open("wb") as f:
        f.truncate(10 << 30)  # sparse: costs nothing, reading it would
    with pytest.raises(GuestMisbehaved, match="bytes to status"):
        channel.read_report("status")


def test_the_limit_is_exact(channel: Channel) -> None:
    (channel.out / "status").write_bytes(b"1" * REPORT_LIMIT)
    assert channel.read_report("status") == b"1" * REPORT_LIMIT
    (channel.out / "status").write_bytes(b"1" * (REPORT_LIMIT + 1))
    with pytest.raises(GuestMisbehaved):
        channel.read_report("status")


def test_binary_garbage_is_returned_as_bytes(channel: Channel) -> None:
    (channel.out / "status").write_bytes(b"\xff\xfe\x00")  # deciding what it means is the parser's job
    assert channel.read_report("status") == b"\xff\xfe\x00"


def test_an_unreadable_report_is_refused(channel: Channel) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    (channel.out / "status").write_bytes(b"0\n")
    (channel.out / "status").chmod(0)
    with pytest.raises(GuestMisbehaved, match="unreadable"):
        channel.read_report("status")


def test_send_never_writes_through_a_planted_link(channel: Channel, canary: Path) -> None:
    # Where the guest could write the control directory (no sandbox), a link in place of the temporary name.
    (channel.ctl / ".stdin.1.tmp").symlink_to(canary)
    with pytest.raises(GuestMisbehaved, match=r"made \.stdin\.1\.tmp"):
        channel.send("stdin.1", b"INJECTED")
    assert canary.read_bytes() == b"precious\n"


def test_send_replaces_a_planted_final_name_without_following_it(channel: Channel, canary: Path) -> None:
    (channel.ctl / "stdin.0").symlink_to(canary)
    channel.send("stdin.0", b"data")
    assert canary.read_bytes() == b"precious\n"
    assert (channel.ctl / "stdin.0").read_bytes() == b"data" and not (channel.ctl / "stdin.0").is_symlink()


def test_sent_files_are_private(channel: Channel) -> None:
    channel.send("job", b"A_V=4\n")
    assert (channel.ctl / "job").stat().st_mode & 0o777 == 0o600


def test_a_replaced_directory_is_not_followed(channel: Channel, canary: Path, tmp_path: Path) -> None:
    # The descriptor holds the directory AppPot made: a link put in its place later changes nothing.
    os.rename(channel.ctl, tmp_path / "moved")
    channel.ctl.symlink_to(canary.parent)
    channel.send("job", b"x")
    assert not (canary.parent / "job").exists() and (tmp_path / "moved" / "job").exists()


def test_a_closed_channel_sends_nothing(channel: Channel) -> None:
    channel.close()
    with pytest.raises(ChannelClosed):
        channel.send("stdin.9", b"late")
    with pytest.raises(ChannelClosed):
        channel.read_report("status")


def test_close_waits_for_a_send_in_progress(channel: Channel) -> None:
    done = threading.Event()

    def sender() -> None:
        for i in range(200):
            try:
                channel.send(f"stdin.{i}", b"x" * 4096)
            except ChannelClosed:
                break
        done.set()

    thread = threading.Thread(target=sender)
    thread.start()
    channel.close()
    thread.join(5)
    assert done.is_set()

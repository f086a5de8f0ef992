"""What the host believes of the guest's stdin reports: never more than it sent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apppot.channel import Channel
from apppot.errors import GuestMisbehaved
from apppot.protocol import STDIN_LEFT, STDIN_POS, STDIN_READ, StdinMode
from apppot.stdin import FILE_LIMIT, ChunkLedger, Source, StdinFile, source_of, stdin_mode


def ledger_of(sizes: list[int]) -> ChunkLedger:
    ledger = ChunkLedger()
    for size in sizes:
        ledger.add(size)
    return ledger


@given(st.lists(st.integers(1, 1 << 20), max_size=20), st.data())
def test_fed_chunks_add_up_to_their_bytes(sizes: list[int], data: st.DataObject) -> None:
    ledger = ledger_of(sizes)
    fed = 0
    for _ in range(3):
        count = data.draw(st.integers(0, len(sizes)))
        ledger.fed(count)
        fed = max(fed, count)  # a count going back is no news
        assert ledger.fed_bytes == sum(sizes[:fed])
        assert ledger.written == len(sizes)


@pytest.mark.parametrize("report", [b"4\n", b"-1\n", b"1.5\n", b"\xd9\xa3\n", b"1 2\n", b"999999999999999999999\n"])
def test_a_chunk_count_beyond_what_was_sent_is_misbehaving(report: bytes) -> None:
    with pytest.raises(GuestMisbehaved, match=STDIN_READ):
        ledger_of([10, 20, 30]).parse_fed(report)


def test_bytes_left_beyond_what_was_fed_is_misbehaving() -> None:
    ledger = ledger_of([10, 20, 30])
    ledger.fed(2)
    assert ledger.parse_left(b"30\n") == 30
    with pytest.raises(GuestMisbehaved, match=STDIN_LEFT):
        ledger.parse_left(b"31\n")


def test_what_stdin_is_decides_how_it_is_passed(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(FILE_LIMIT + 1)  # sparse
    read_end, write_end = os.pipe()
    try:
        with small.open("rb") as s, big.open("rb") as b:
            assert (stdin_mode(s.fileno()), source_of(s.fileno())) == (StdinMode.FILE, Source.FILE)
            assert (stdin_mode(b.fileno()), source_of(b.fileno())) == (StdinMode.SPOOL, Source.FILE)
        assert (stdin_mode(read_end), source_of(read_end)) == (StdinMode.SPOOL, Source.PIPE)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_file_is_left_where_the_guest_says_and_never_past_its_end(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.write_bytes(b"0123456789")
    with source.open("rb") as f:
        f.seek(3)
        channel = Channel(tmp_path)
        try:
            feed = StdinFile(channel, lambda: None, f.fileno())
            feed.start()
            feed.join()
            assert (channel.ctl / "stdin.file").read_bytes() == b"3456789"
            (channel.out / STDIN_POS).write_bytes(b"4\n")
            feed.settle()
            assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 7
            (channel.out / STDIN_POS).write_bytes(b"8\n")  # only 7 were sent
            with pytest.raises(GuestMisbehaved, match=STDIN_POS):
                feed.settle()
        finally:
            channel.close()

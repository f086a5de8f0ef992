"""The output relay on real pipes: byte-exact under any chunking and reader speed, failures kept and named."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apppot import relay
from apppot.relay import Relay, drain, lost_output


def pattern(size: int, seed: int) -> bytes:
    """Bytes that differ from chunk to chunk, so a lost, doubled or reordered chunk shows."""
    block = bytes((seed * 7 + i) % 251 for i in range(251))
    return (block * (size // 251 + 1))[:size]


def write_chunks(fd: int, chunks: list[bytes]) -> threading.Thread:
    def run() -> None:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


class Reader(threading.Thread):
    """Reads a pipe to its end in the given sizes, pausing as told between reads."""

    def __init__(self, fd: int, sizes: list[int], pauses: list[float]) -> None:
        super().__init__()
        self.fd, self.sizes, self.pauses = fd, sizes or [1 << 16], pauses or [0.0]
        self.data = bytearray()

    def run(self) -> None:
        n = 0
        while True:
            time.sleep(self.pauses[n % len(self.pauses)])
            chunk = os.read(self.fd, self.sizes[n % len(self.sizes)])
            if not chunk:
                break
            self.data += chunk
            n += 1
        os.close(self.fd)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 150_000), max_size=8),
    read_sizes=st.lists(st.integers(64, 70_000), max_size=5),
    pauses=st.lists(st.sampled_from([0.0, 0.0, 0.0005, 0.003]), max_size=5),
    nonblocking=st.booleans(),
)
def test_every_byte_arrives_in_order_whatever_the_chunks_and_the_reader(
    sizes: list[int], read_sizes: list[int], pauses: list[float], nonblocking: bool
) -> None:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    fcntl.fcntl(dst_w, fcntl.F_SETPIPE_SZ, 4096)  # the host's reader lags often: writes block, or EAGAIN
    os.set_blocking(dst_w, not nonblocking)
    chunks = [pattern(size, seed) for seed, size in enumerate(sizes)]
    broken: list[bool] = []
    r = Relay(src_r, dst_w, "stdout", lambda: broken.append(True))
    r.start()
    reader = Reader(dst_r, read_sizes, pauses)
    reader.start()
    writer = write_chunks(src_w, chunks)
    writer.join()
    drain([r], lambda: False)
    os.close(dst_w)
    reader.join()
    assert bytes(reader.data) == b"".join(chunks)
    assert (r.error, r.broken, r.held_open, broken) == (None, False, False, [])


def test_a_failing_stream_is_named_and_the_guest_is_still_drained() -> None:
    src_r, src_w = os.pipe()
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        r = Relay(src_r, full, "stdout", lambda: None)
        r.start()
        writer = write_chunks(src_w, [b"x" * 1_000_000])  # 15 pipe buffers: it ends only if the relay drains
        writer.join(10)
        assert not writer.is_alive()
        drain([r], lambda: False)
    finally:
        os.close(full)
    assert r.error is not None and r.error.errno == errno.ENOSPC
    lost = lost_output([r], 3)
    assert str(lost) == "cannot write the job's stdout: No space left on device (the job itself exited with 3)"
    assert lost is not None and lost.exit_code == 125


def test_a_stream_closed_at_start_fails_only_if_the_job_writes() -> None:
    relays = []
    for data in (b"", b"hi\n"):
        src_r, src_w = os.pipe()
        r = Relay(src_r, None, "stderr", lambda: None)
        r.start()
        write_chunks(src_w, [data] if data else []).join()
        drain([r], lambda: False)
        relays.append(r)
    assert lost_output(relays[:1], 0) is None
    assert str(lost_output(relays[1:], 0)) == (
        "cannot write the job's stderr: Bad file descriptor, closed when apppot started (the job itself exited with 0)"
    )


def test_both_streams_failing_are_one_line() -> None:
    a, b = Relay(0, None, "stdout", lambda: None), Relay(0, None, "stderr", lambda: None)
    a.error = OSError(errno.EIO, os.strerror(errno.EIO))
    b.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(lost_output([a, b], 1)) == (
        "cannot write the job's stdout: Input/output error, nor the job's stderr: No space left on device"
        " (the job itself exited with 1)"
    )


def test_a_reader_that_went_away_is_a_broken_pipe_and_the_rest_is_drained() -> None:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    os.close(dst_r)
    told: list[bool] = []
    r = Relay(src_r, dst_w, "stdout", lambda: told.append(True))
    r.start()
    write_chunks(src_w, [b"y" * 500_000]).join(10)
    drain([r], lambda: False)
    os.close(dst_w)
    assert (r.broken, told, r.error) == (True, [True], None)
    assert lost_output([r], 0) is None  # the runner turns it into 141, as SIGPIPE would


def test_a_pipe_held_open_after_the_stop_is_given_up_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "HELD_OPEN_S", 0.3)
    src_r, src_w = os.pipe()  # src_w stays open: a leftover process holding the guest's write end
    dst_r, dst_w = os.pipe()
    r = Relay(src_r, dst_w, "stdout", lambda: None)
    r.start()
    os.write(src_w, b"before\n")
    started = time.monotonic()
    drain([r], lambda: False)
    assert 0.3 <= time.monotonic() - started < 3
    assert r.held_open and os.read(dst_r, 100) == b"before\n"
    assert str(lost_output([r], 0)) == (
        "cannot write all of the job's stdout: a process left over held it open after the guest ended"
        " (the job itself exited with 0)"
    )
    os.close(src_w)
    r.join(5)
    for fd in (dst_r, dst_w):
        os.close(fd)


def test_a_signal_stops_the_wait_for_a_reader_that_never_reads() -> None:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()  # never read: the relay blocks writing, which drain alone waits out
    r = Relay(src_r, dst_w, "stdout", lambda: None)
    r.start()
    writer = write_chunks(src_w, [b"z" * 200_000])
    deadline = time.monotonic() + 0.5
    drain([r], lambda: time.monotonic() > deadline)
    assert r.is_alive() and not r.held_open  # writing, not waiting for data: never given up by itself
    os.close(dst_r)  # the relay now meets EPIPE and drains the rest
    writer.join(10)
    r.join(10)
    assert r.broken
    os.close(dst_w)

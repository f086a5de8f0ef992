"""The job's stdin: byte-exact, and AppPot leaves the host's stdin where the job stopped reading."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import APPPOT
from tests.integration.conftest import BOTH_BACKENDS

pytestmark = pytest.mark.uml

# `"$@"` is `apppot start -- ...` (the fixture appends it); then the rest of stdin goes to cat.
THEN_CAT = ["sh", "-c", '"$@"; cat', "sh"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@BOTH_BACKENDS
def test_a_while_read_loop_gets_every_line(apppot, backend: str, jobdir: Path) -> None:
    # The reproduction: each job reads nothing, so the loop's `read` must find every line.
    loop = ["sh", "-c", """printf 'a\\nb\\nc\\n' | while read -r x; do "$@" sh -c 'echo got $0' "$x"; done""", "sh"]
    r = apppot(["start", "--"], cwd=jobdir, prefix=loop, timeout=300)
    assert (r.returncode, r.stdout) == (0, b"got a\ngot b\ngot c\n"), r.err


def test_a_file_read_in_part_leaves_the_rest_to_the_next_reader(apppot, jobdir: Path, tmp_path: Path) -> None:
    source = tmp_path / "lines"
    source.write_bytes(b"first\n" + b"".join(b"line %d\n" % i for i in range(2000)))
    with source.open("rb") as f:
        r = apppot(["start", "--", "head", "-n1"], cwd=jobdir, stdin=f.fileno(), prefix=THEN_CAT)
    assert r.returncode == 0, r.err
    assert r.stdout == source.read_bytes()  # as `(head -n1; cat) < lines` on the host


def test_a_pipe_read_in_part_leaves_the_rest_to_the_next_reader(apppot, jobdir: Path) -> None:
    data = os.urandom(3_000_000)
    # dd reads once (head would read a buffer's worth, as it does on the host)
    job = ["sh", "-c", "dd bs=1000 count=1 2>/dev/null"]
    r = apppot(["start", "--", *job], cwd=jobdir, stdin=data, prefix=THEN_CAT, timeout=300)
    assert r.returncode == 0, r.err
    assert (len(r.stdout), sha(r.stdout)) == (len(data), sha(data))  # the job's bytes, then cat's: none lost, none twice


@BOTH_BACKENDS
def test_a_non_blocking_stdin_is_waited_for(apppot, backend: str, jobdir: Path) -> None:
    data = os.urandom(1_000_000)
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, fcntl.F_SETFL, fcntl.fcntl(read_end, fcntl.F_GETFL) | os.O_NONBLOCK)

    def trickle() -> None:  # slower than AppPot reads: it meets EAGAIN often
        for i in range(0, len(data), 50_000):
            os.write(write_end, data[i : i + 50_000])
            time.sleep(0.05)
        os.close(write_end)

    writer = threading.Thread(target=trickle)
    writer.start()
    try:
        r = apppot(["start", "--", "sha256sum"], cwd=jobdir, stdin=read_end, timeout=300)
    finally:
        os.close(read_end)
        writer.join()
    assert r.returncode == 0, r.err
    assert r.stdout.split()[0].decode() == sha(data)


@pytest.mark.parametrize("via", ["pipe", "file"])
def test_fifty_megabytes_read_whole_are_byte_exact(apppot, jobdir: Path, tmp_path: Path, via: str) -> None:
    data = os.urandom(50 * 1000 * 1000)
    if via == "pipe":
        r = apppot(["start", "--", "sha256sum"], cwd=jobdir, stdin=data, prefix=THEN_CAT, timeout=300)
    else:
        source = tmp_path / "in.bin"
        source.write_bytes(data)
        with source.open("rb") as f:
            r = apppot(["start", "--", "sha256sum"], cwd=jobdir, stdin=f.fileno(), prefix=THEN_CAT, timeout=300)
    assert r.returncode == 0, r.err
    assert r.stdout == f"{sha(data)}  -\n".encode()  # and nothing left for cat


@pytest.mark.parametrize("flag", ["-n", "--no-stdin"])
def test_no_stdin_leaves_the_hosts_stdin_unread(apppot, jobdir: Path, flag: str) -> None:
    r = apppot(["start", flag, "--", "wc", "-c"], cwd=jobdir, stdin=b"for the next reader\n", prefix=THEN_CAT)
    assert (r.returncode, r.stdout) == (0, b"0\nfor the next reader\n"), r.err


def test_the_seed_command_takes_no_stdin_too(apppot, jobdir: Path) -> None:
    seed = str(Path(APPPOT).parent / "apppot-start")
    then_cat = ["sh", "-c", 'shift; "$0" -n -- wc -c; cat', seed]  # the fixture's apppot is shifted away
    r = apppot([], cwd=jobdir, stdin=b"kept\n", prefix=then_cat)
    assert (r.returncode, r.stdout) == (0, b"0\nkept\n"), r.err

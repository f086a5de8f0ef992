"""The host's descriptors 0-2: closed ones filled at every entry point, one open file told from two."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from apppot import hostfds
from apppot.images import snaptool
from apppot.protocol import GuestJob, StreamMode, render_job_file
from tests.conftest import APPPOT

PYTHON = sys.executable


def test_a_pipe_or_a_device_is_one_stream_however_it_was_opened(tmp_path: Path) -> None:
    r, w = os.pipe()
    w2 = os.dup(w)
    other_r, other_w = os.pipe()
    null1, null2 = os.open(os.devnull, os.O_WRONLY), os.open(os.devnull, os.O_WRONLY)
    try:
        assert hostfds.same_open_file(w, w2)
        assert not hostfds.same_open_file(w, other_w)
        assert hostfds.same_open_file(null1, null2)
    finally:
        for fd in (r, w, w2, other_r, other_w, null1, null2):
            os.close(fd)


@pytest.mark.parametrize("probe", [hostfds.same_open_file, hostfds._offset_is_shared])
def test_a_regular_file_is_one_stream_only_as_one_open_file(tmp_path: Path, probe: Callable[[int, int], bool]) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"0123456789")
    first = os.open(log, os.O_WRONLY)
    shared = os.dup(first)  # `>log 2>&1`
    again = os.open(log, os.O_WRONLY)  # `>log 2>log`: the same file, another offset
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)
    try:
        os.lseek(first, 4, os.SEEK_SET)
        assert probe(first, shared)
        assert not probe(first, again)
        os.lseek(again, 4, os.SEEK_SET)  # even at the same offset
        assert not probe(first, again)
        if probe is hostfds.same_open_file:
            assert not probe(first, other)
        assert os.lseek(first, 0, os.SEEK_CUR) == 4  # the probe put the offset back
        assert log.read_bytes() == b"0123456789"  # and wrote nothing
    finally:
        for fd in (first, shared, again, other):
            os.close(fd)


def run_closed(code: str, closing: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'"$@" {closing}', "bash", PYTHON, "-c", code], capture_output=False, text=True, check=False
    )


def test_closed_descriptors_get_dev_null_and_are_remembered(tmp_path: Path) -> None:
    report = tmp_path / "report"
    code = f"""
import os, sys
from apppot import hostfds
from apppot.images import snaptool
closed = hostfds.fill_closed()
probe = os.open(os.devnull, os.O_RDONLY)  # takes none of 0-2 now
null = os.stat(os.devnull).st_rdev
filled = [os.fstat(fd).st_rdev == null for fd in (0, 1, 2)]
try:
    print("lost")
    outcome = "printed"
except OSError as e:
    outcome = e.strerror
sys.stderr.write("not a crash\\n")
open({str(report)!r}, "w").write(repr((sorted(closed), probe, filled, outcome, hostfds.stdout_is_stderr())))
os._exit(0)  # as apppot leaves: the interpreter's own exit would flush the failed stdout once more
"""
    assert run_closed(code, "<&- >&- 2>&-").returncode == 0
    assert report.read_text() == "([0, 1, 2], 3, [True, True, True], 'Bad file descriptor, closed when apppot started', False)"
    assert run_closed(code, ">&-").returncode == 0
    closed, _, _, outcome, _ = eval(report.read_text())
    assert (closed, outcome) == ([1], "Bad file descriptor, closed when apppot started")


@pytest.mark.parametrize("program", ["apppot", "apppot-start"])
def test_entry_points_survive_closed_descriptors(program: str) -> None:
    exe = str(Path(APPPOT).with_name(program))
    for closing, code in ((">&-", 125), ("2>&-", 0), ("<&- 2>&-", 0)):
        r = subprocess.run(["bash", "-c", f'"$@" {closing}', "bash", exe, "--help"], capture_output=True, text=True, check=False)
        assert r.returncode == code, (closing, r.stderr)
        assert "Traceback" not in r.stderr
    r = subprocess.run(["bash", "-c", '"$@" >&-', "bash", exe, "--help"], capture_output=True, text=True, check=False)
    assert r.stderr == "apppot: error: cannot write stdout: Bad file descriptor, closed when apppot started\n"


def test_apppot_snap_survives_closed_descriptors(tmp_path: Path) -> None:
    snap = tmp_path / "apppot-snap"
    snaptool.build(snap)  # as images carry it
    args = [PYTHON, str(snap), "--root", str(tmp_path), "manifest", str(tmp_path / "m.gz")]
    r = subprocess.run(["bash", "-c", '"$@" >&-', "bash", *args], capture_output=True, text=True, check=False)
    assert (r.returncode, r.stderr) == (
        1,
        "apppot-snap: error: stdout (closed when apppot-snap started): Bad file descriptor\n",
    )
    r = subprocess.run(["bash", "-c", '"$@" 2>&- <&-', "bash", *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.startswith("apppot-snap: ")


def test_stderr_on_the_stdout_channel_is_in_the_job_file() -> None:
    text = render_job_file(GuestJob(argv=("true",), stderr=StreamMode.STDOUT))
    assert b"A_STDERR='stdout'\n" in text

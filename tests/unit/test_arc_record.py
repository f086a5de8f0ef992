"""The ARC wrapper keeps AppPot's record out of the session directory (which the job writes) until
apppot-start has ended, then puts it in place of whatever the job left under its name: run with real sh
and a stand-in apppot-start that plays the job (it forges the record) and AppPot (it writes or not)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from apppot.spec import MIB
from apppot.submit import arc
from apppot.submit.job import RECORD, BatchJob

JOB = BatchJob(argv=("run",), image=None, mem_bytes=256 * MIB, wall_seconds=60, cores=1, name="t")
# The stand-in: the job forges apppot-record.json in its directory; AppPot writes its record to
# $APPPOT_RECORD (when WRITE is set), which must be outside that directory.
START = """#!/bin/sh
printf '{"forged": true}' > apppot-record.json
printf '%s' "$APPPOT_RECORD" > "$WHERE"
case "$APPPOT_RECORD" in /*) ;; *) exit 97 ;; esac
case "$APPPOT_RECORD" in "$(pwd -P)"/*) exit 98 ;; esac
$LEAVE
if [ -n "$SLOW" ]; then trap 'printf "{\\"stopped\\": 1}" > "$APPPOT_RECORD"; exit 143' TERM; touch started; sleep 30 & wait; fi
[ -z "$WRITE" ] || printf '{"apppot": true}' > "$APPPOT_RECORD"
exit 3
"""


def run_wrapper(tmp_path: Path, write: bool, leave: str = "", tmpdir: str | None = None) -> tuple[int, Path, Path]:
    session = tmp_path / "session"
    session.mkdir(exist_ok=True)
    wrapper = session / arc.WRAPPER
    wrapper.write_text(arc.render_wrapper(JOB))
    start = tmp_path / "apppot-start"
    start.write_text(START)
    start.chmod(0o755)
    where = tmp_path / "where"
    env = {"PATH": "/usr/bin:/bin", "APPPOT_START": str(start), "APPPOT_IMAGE": "x.img", "WHERE": str(where), "LEAVE": leave}
    env |= {"WRITE": "1"} if write else {}
    env |= {"TMPDIR": tmpdir} if tmpdir is not None else {}
    r = subprocess.run(["sh", arc.WRAPPER], cwd=session, env=env, check=False, timeout=30)
    return r.returncode, session, Path(where.read_text())


def test_apppots_record_replaces_what_the_job_left(tmp_path: Path) -> None:
    status, session, kept = run_wrapper(tmp_path, write=True)
    assert status == 3  # apppot-start's status is the ARC job's
    assert (session / RECORD).read_text() == '{"apppot": true}'
    assert not kept.parent.exists()  # the private directory is gone


def test_no_record_is_left_when_apppot_wrote_none(tmp_path: Path) -> None:
    """An apppot-start that wrote no record (a site's older one, or killed): the job's forgery is not fetched."""
    status, session, _ = run_wrapper(tmp_path, write=False)
    assert status == 3 and not (session / RECORD).exists()


@pytest.mark.parametrize(
    "leave",
    [
        "rm apppot-record.json; mkdir -p apppot-record.json/d; touch apppot-record.json/d/f; chmod a-w apppot-record.json/d .",
        "rm apppot-record.json; ln -s /etc/passwd apppot-record.json",
        "rm apppot-record.json; mkfifo apppot-record.json",
    ],
    ids=["unwritable-directory", "link", "fifo"],
)
def test_whatever_the_job_left_under_the_name_is_removed(tmp_path: Path, leave: str) -> None:
    status, session, _ = run_wrapper(tmp_path, write=True, leave=leave)
    assert status == 3
    assert not (session / RECORD).is_symlink() and (session / RECORD).read_text() == '{"apppot": true}'


def test_a_tmpdir_inside_the_session_directory_is_not_used(tmp_path: Path) -> None:
    inside = tmp_path / "session" / "tmp"  # ARC's scratch set-ups may point TMPDIR there
    inside.mkdir(parents=True)
    status, session, kept = run_wrapper(tmp_path, write=True, tmpdir=str(inside))
    assert status == 3 and not kept.is_relative_to(session) and (session / RECORD).read_text() == '{"apppot": true}'


def test_a_job_stopped_by_the_batch_system_still_gets_apppots_record(tmp_path: Path) -> None:
    """SIGTERM to the whole job (as Slurm sends at the wall time): the wrapper waits for apppot-start's record."""
    session = tmp_path / "session"
    session.mkdir()
    (session / arc.WRAPPER).write_text(arc.render_wrapper(JOB))
    start = tmp_path / "apppot-start"
    start.write_text(START)
    start.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "APPPOT_START": str(start), "APPPOT_IMAGE": "x", "WHERE": str(tmp_path / "w"), "SLOW": "1"}
    env["LEAVE"] = ""
    with subprocess.Popen(["sh", arc.WRAPPER], cwd=session, env=env, start_new_session=True) as proc:
        deadline = time.monotonic() + 10
        while not (session / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 143
    assert (session / RECORD).read_text() == '{"stopped": 1}'

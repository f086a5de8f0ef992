"""ARC: the xRSL description and the wrapper of a job (golden), and ARC's own parser reading the xRSL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from apppot.errors import UsageError
from apppot.spec import MIB
from apppot.submit import arc
from apppot.submit.job import BatchJob

JOB = BatchJob(
    argv=("./run.sh", 'say "hi")', "$HOME"),
    image=Path("/images/app.img"),
    mem_bytes=1024 * MIB,
    wall_seconds=7200,
    cores=2,
    changes=Path("/home/u/mine.tar.gz"),
    inputs=(Path("/home/u/data.in"),),
    outputs=("result.txt",),
    name="test",
)
ROOT = Path(__file__).resolve().parents[2]


def test_xrsl_golden() -> None:
    assert arc.render_xrsl(JOB) == (
        '&(executable="apppot-job.sh")\n'
        ' (jobname="test")\n'
        ' (runtimeenvironment="APPS/APPPOT-0")\n'
        ' (walltime="7200 seconds")\n'
        ' (memory="544")\n'
        ' (count="2")(countpernode="2")\n'
        ' (inputfiles=("apppot-job.sh" "")("data.in" "")("apppot-changes.tar.gz" "")("apppot.img" "file:///images/app.img"))\n'
        ' (outputfiles=("apppot-record.json" "")("result.txt" ""))\n'
        ' (stdout="stdout.txt")(stderr="stderr.txt")\n'
        ' (gmlog="gmlog")\n'
    )


def test_xrsl_with_the_sites_image_and_no_changes_or_outputs() -> None:
    xrsl = arc.render_xrsl(JOB._replace(changes=None, outputs=(), inputs=(), cores=1, mem_bytes=256 * MIB, image=None))
    assert '(inputfiles=("apppot-job.sh" ""))' in xrsl and '(memory="320")' in xrsl
    assert '(outputfiles=("apppot-record.json" ""))' in xrsl  # the job's record comes back, always
    assert "apppot.img" not in xrsl


def test_wrapper_golden_and_valid_sh(tmp_path: Path) -> None:
    wrapper = arc.render_wrapper(JOB._replace(image=None))
    # The record is kept apart from the session directory (tests/unit/test_arc_record.py runs that part).
    assert wrapper.splitlines()[3] == (
        ': "${APPPOT_START:?the site has no APPPOT runtime environment}" '
        '"${APPPOT_IMAGE:?the site\'s APPPOT runtime environment sets no image}"'
    )
    assert wrapper.splitlines()[11] == (
        'APPPOT_RECORD="$kept/record.json" "$APPPOT_START" --image "$APPPOT_IMAGE" --mem 1024M '
        "--changes apppot-changes.tar.gz -- ./run.sh 'say \"hi\")' '$HOME'"
    )
    assert wrapper.splitlines()[-1] == 'exit "$status"'
    script = tmp_path / "w.sh"
    script.write_text(wrapper)
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    # Without the runtime environment the job says why and fails.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp)}
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, check=False)
    assert r.returncode != 0 and "the site has no APPPOT runtime environment" in r.stderr
    assert list(tmp.iterdir()) == []  # before the record's directory is made
    assert '"$APPPOT_START" --image "apppot.img"' in arc.render_wrapper(JOB)
    assert "APPPOT_IMAGE" not in arc.render_wrapper(JOB)  # the job's own image: the site need not set one
    assert "apppot-record.json" in arc.RESERVED


PARSE = """
import arc, json, os, sys
jobs = arc.JobDescriptionList()
ok = bool(arc.JobDescription.Parse(sys.stdin.read(), jobs, "nordugrid:xrsl", ""))
out = {"ok": ok}
if ok:
    j = jobs.front()
    out.update(
        executable=j.Application.Executable.Path,
        wall=j.Resources.TotalWallTime.range.max,
        memory=j.Resources.IndividualPhysicalMemory.max,
        slots=j.Resources.SlotRequirement.NumberOfSlots,
        rte=[str(x) for x in j.Resources.RunTimeEnvironment.getSoftwareList()],
        inputs=[f.Name for f in j.DataStaging.InputFiles],
        outputs=[f.Name for f in j.DataStaging.OutputFiles],
        stdout=j.Application.Output,
    )
print(json.dumps(out))
sys.stdout.flush()
os._exit(0)  # ARC's binding may hang in its destructors at exit
"""


def arc_parser() -> str:
    """The Python that has ARC's binding (Debian's python3-nordugrid-arc: only the system Python)."""
    python = shutil.which("python3", path="/usr/bin")
    if python is None or subprocess.run([python, "-c", "import arc"], capture_output=True, check=False).returncode != 0:
        pytest.skip("ARC's Python binding is not installed (python3-nordugrid-arc; make test installs it)")
    return python


def test_arcs_own_parser_reads_the_xrsl() -> None:
    python = arc_parser()
    r = subprocess.run([python, "-c", PARSE], input=arc.render_xrsl(JOB), capture_output=True, text=True, timeout=60)
    parsed = json.loads(r.stdout)
    assert parsed == {
        "ok": True,
        "executable": "apppot-job.sh",
        "wall": 7200,
        "memory": 544,
        "slots": 2,
        "rte": ["APPS/APPPOT-0"],
        "inputs": ["apppot-job.sh", "data.in", "apppot-changes.tar.gz", "apppot.img"],
        "outputs": ["apppot-record.json", "result.txt"],
        "stdout": "stdout.txt",
    }


def test_arcstat_parsing_and_states() -> None:
    from apppot.submit import jobs

    text = (
        "Job: https://localhost:8443/arex/rest/1.0/jobs/abc\n Name: t\n"
        " State: Finished (terminal:client-stageout-possible)\n Exit Code: 3\n"
    )
    assert arc.parse_arcstat(text) == ("Finished", 3)
    assert arc.parse_arcstat(" State: Running (INLRMS:R)\n") == ("Running", None)
    assert arc.parse_arcstat("WARNING: Job information not found") is None
    assert [jobs._arc_state(s, c) for s, c in [("Finished", 0), ("Finished", 3), ("Failed", 1), ("Killed", None)]] == [
        "COMPLETED",
        "FAILED",
        "FAILED",
        "CANCELLED",
    ]
    assert [jobs._arc_state(s, None) for s in ("Accepted", "Preparing", "Queuing", "Running", "Finishing")] == [
        "PENDING",
        "PENDING",
        "PENDING",
        "RUNNING",
        "RUNNING",
    ]


def test_the_test_ce_configuration() -> None:
    from apppot.testbed.arc import render_arc_conf

    conf = render_arc_conf(Path("/tb/arc"), Path("/tb/etc/slurm.conf"), "alice")
    assert "map_to_user = apppot alice:alice" in conf and "lrms = slurm" in conf
    assert "wsurl = https://localhost:8443/arex" in conf and "runtimedir = /tb/arc/rte" in conf


@pytest.mark.parametrize("name", list(arc.RESERVED))
def test_inputs_cannot_take_the_names_apppot_stages(name: str) -> None:
    with pytest.raises(UsageError, match=f"--input '{name}' has the name of a file AppPot stages for ARC itself"):
        arc.render_xrsl(JOB._replace(inputs=(Path("/home/u") / name,)))


@pytest.mark.parametrize(
    ("job", "problem"),
    [
        (JOB._replace(inputs=(Path(os.fsdecode(b"/home/u/caf\xe9")),)), "is not UTF-8"),
        (JOB._replace(outputs=(os.fsdecode(b"caf\xe9"),)), "is not UTF-8"),
        (JOB._replace(inputs=(Path("/home/u/a\nb"),)), "has a control character"),
        (JOB._replace(name='x")(executable="/bin/sh'), "invalid --name"),
    ],
)
def test_names_xrsl_cannot_carry_are_refused(job: BatchJob, problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        arc.render_xrsl(job)


def test_the_wrapper_passes_hostile_arguments_exactly(tmp_path: Path) -> None:
    words = ("x\ntouch /tmp/INJECTED #", "%j", 'it\'s "q"', "$(id)", os.fsdecode(b"caf\xe9"), "")
    wrapper = tmp_path / "w.sh"
    wrapper.write_bytes(os.fsencode(arc.render_wrapper(JOB._replace(argv=words, changes=None))))
    start = tmp_path / "apppot-start"
    start.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$RECORD"\n')
    start.chmod(0o755)
    record = tmp_path / "argv"
    env = {"PATH": "/usr/bin:/bin", "APPPOT_START": str(start), "RECORD": str(record)}
    assert subprocess.run(["sh", str(wrapper)], env=env, check=False).returncode == 0
    expected = ["--image", "apppot.img", "--mem", "1024M", "--", *words]
    assert record.read_bytes().split(b"\0")[:-1] == [os.fsencode(w) for w in expected]

"""The batch job model and Slurm's side of it: the batch script, time formats, state parsing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from apppot.errors import UsageError
from apppot.spec import MIB
from apppot.submit import jobs, slurm
from apppot.submit.job import BatchJob, check_job_name, check_output_name, format_wall_time, parse_wall_time
from apppot.testbed import LocalCluster, render_slurm_conf

JOB = BatchJob(
    argv=("./run.sh", "data in", "$HOME"),
    image=Path("/images/app.img"),
    mem_bytes=1024 * MIB,
    wall_seconds=7200,
    cores=2,
    changes=Path("/home/u/mine.tar.gz"),
    inputs=(Path("/home/u/data in"),),
    outputs=("result.txt",),
    name="test",
)


def test_sbatch_script_golden() -> None:
    assert slurm.render_sbatch(JOB, Path("/stage"), "/venv/bin/apppot") == (
        "#!/bin/sh\n"
        "#SBATCH --job-name=test\n"
        "#SBATCH --mem=1088M\n"
        "#SBATCH --time=02:00:00\n"
        "#SBATCH --cpus-per-task=2\n"
        "#SBATCH --nodes=1\n"
        "#SBATCH --output=../stdout.txt\n"
        "#SBATCH --error=../stderr.txt\n"
        "# sbatch --chdir is the staged job directory; stdout and stderr go next to it.\n"
        "# The guest needs memory of its own besides the job's: see apppot.submit.job.UML_OVERHEAD.\n"
        "exec /venv/bin/apppot start --record /stage/apppot-record.json --image /images/app.img --mem 1024M "
        "--changes /stage/job/mine.tar.gz -- "
        "./run.sh 'data in' '$HOME'\n"
    )


def test_sbatch_is_given_the_job_directory_as_an_argument_of_its_own() -> None:
    hostile = Path("/c a/%j\n#SBATCH --mem=1M/job")
    assert slurm.sbatch_argv("sbatch", Path("/s/job.sh"), hostile) == [
        "sbatch",
        "--parsable",
        "--chdir",
        str(hostile),
        "/s/job.sh",
    ]


def test_sbatch_script_without_changes() -> None:
    script = slurm.render_sbatch(JOB._replace(changes=None, mem_bytes=256 * MIB, cores=1), Path("/s"), "apppot")
    assert "#SBATCH --mem=320M\n" in script and "--changes" not in script and "--cpus-per-task=1\n" in script


def test_batch_memory_covers_the_guest_and_uml() -> None:
    assert JOB._replace(mem_bytes=256 * MIB).batch_mem_mib() == 320
    assert JOB._replace(mem_bytes=256 * MIB + 1).batch_mem_mib() == 321


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("1:30", 90), ("2:00:00", 7200), ("1-12", 129600), ("1-12:30", 131400), ("1-0:0:5", 86405)],
)
def test_wall_time_formats(text: str, seconds: int) -> None:
    assert parse_wall_time(text) == seconds


@pytest.mark.parametrize("text", ["", "1:2:3:4", "x", "-5", "0", "1-x"])
def test_bad_wall_times(text: str) -> None:
    with pytest.raises(UsageError, match="--time"):
        parse_wall_time(text)


def test_format_wall_time() -> None:
    assert (format_wall_time(90), format_wall_time(7200), format_wall_time(90061)) == ("00:01:30", "02:00:00", "1-01:01:01")


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../b", ""])
def test_outputs_stay_in_the_job_directory(name: str) -> None:
    with pytest.raises(UsageError, match="--output"):
        check_output_name(name)


def test_scontrol_and_sacct_parsing() -> None:
    line = "JobId=7 JobName=apppot UserId=u(1000) JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 RunTime=00:00:01"
    assert slurm.parse_scontrol(line) == ("FAILED", 3, 0)
    assert slurm.parse_scontrol("slurm_load_jobs error: Invalid job id specified") is None
    assert slurm.parse_sacct("6|COMPLETED|0:0\n7|CANCELLED by 0|0:15\n", "7") == ("CANCELLED", 0, 15)
    assert slurm.parse_sacct("6|COMPLETED|0:0\n", "7") is None


@pytest.mark.parametrize(
    ("state", "code", "text"),
    [
        ("COMPLETED", 0, "the job exited with status 0"),
        ("FAILED", 3, "the job exited with status 3"),
        ("TIMEOUT", 0, "killed at its wall-time limit (--time)"),
        ("NODE_FAIL", None, "the node running it was lost"),
        ("FAILED", 122, "the guest died before reporting the job's status (see stderr.txt: apppot fetch)"),
        ("FAILED", 125, "AppPot could not run the job (see stderr.txt: apppot fetch)"),
        ("RUNNING", None, ""),
    ],
)
def test_status_explanations(state: str, code: int | None, text: str) -> None:
    assert jobs.explain(state, code) == text


def test_testbed_configuration_keeps_to_loopback() -> None:
    conf = render_slurm_conf(LocalCluster(Path("/tb"), 3), cpus=2, mem_mib=1000)
    assert "NodeName=n[1-3] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17003] CPUs=2 RealMemory=1000" in conf
    assert "SlurmctldHost=localhost(127.0.0.1)" in conf and "JobCompLoc=/tb/log/jobcomp.txt" in conf
    assert "NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 " in render_slurm_conf(
        LocalCluster(Path("/tb"), 1), 1, 10
    )


# Hostile names: a newline, '#', '%', blanks, quotes and bytes that are not UTF-8, in the command,
# the staging path (from $XDG_CACHE_HOME), the image path and the apppot path.
HOSTILE_WORDS = ("x\ntouch /tmp/INJECTED #", "%j %x", 'it\'s "quoted"', "$(id)", os.fsdecode(b"caf\xe9"), "-", "")
HOSTILE_STAGE = Path(os.fsdecode(b"/c a/%j\n#SBATCH --mem=1M/\xff'\""))


def sbatch_directives(script: bytes) -> list[bytes]:
    """The #SBATCH lines sbatch reads: those before the first line that is neither a comment nor blank."""
    directives = []
    for line in script.split(b"\n")[1:]:
        if line.strip() and not line.startswith(b"#"):
            break
        if line.startswith(b"#SBATCH"):
            directives.append(line)
    return directives


def test_hostile_names_cannot_reach_the_sbatch_directives() -> None:
    job = JOB._replace(argv=HOSTILE_WORDS, image=HOSTILE_STAGE / "app.img", changes=HOSTILE_STAGE / "c.tar.gz")
    script = os.fsencode(slurm.render_sbatch(job, HOSTILE_STAGE, str(HOSTILE_STAGE / "apppot")))
    assert sbatch_directives(script) == [
        b"#SBATCH --job-name=test",
        b"#SBATCH --mem=1088M",
        b"#SBATCH --time=02:00:00",
        b"#SBATCH --cpus-per-task=2",
        b"#SBATCH --nodes=1",
        b"#SBATCH --output=../stdout.txt",
        b"#SBATCH --error=../stderr.txt",
    ]


def test_hostile_names_reach_apppot_start_exactly(tmp_path: Path) -> None:
    """Run the rendered script with sh, with a stand-in apppot that records its arguments."""
    stage = tmp_path / os.fsdecode(b"c a%j\n#SBATCH \xff'\"")
    (stage / "job").mkdir(parents=True)
    apppot = stage / "apppot"
    apppot.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$RECORD"\n')
    apppot.chmod(0o755)
    job = JOB._replace(argv=HOSTILE_WORDS, image=stage / "app.img", changes=stage / "c.tar.gz")
    script = stage / "job.sh"
    script.write_bytes(os.fsencode(slurm.render_sbatch(job, stage, str(apppot))))
    record = tmp_path / "argv"
    r = subprocess.run(["sh", str(script)], env={"PATH": "/usr/bin:/bin", "RECORD": str(record)}, capture_output=True)
    assert r.returncode == 0, r.stderr
    expected = ["start", "--record", str(stage / "apppot-record.json"), "--image", str(stage / "app.img"), "--mem", "1024M"]
    expected += ["--changes", str(stage / "job" / "c.tar.gz")]
    assert record.read_bytes().split(b"\0")[:-1] == [os.fsencode(w) for w in [*expected, "--", *HOSTILE_WORDS]]


@pytest.mark.parametrize("name", ["x\ntouch /tmp/INJECTED #", "a b", "50%", "it's", os.fsdecode(b"caf\xe9"), "", "-x", "a" * 65])
def test_job_names_that_are_not_one_word_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="invalid --name"):
        slurm.render_sbatch(JOB._replace(name=name), Path("/s"), "apppot")
    with pytest.raises(UsageError, match="invalid --name"):
        check_job_name(name)


@pytest.mark.parametrize("name", ["stdout.txt", "./stderr.txt", "apppot-record.json"])
def test_outputs_cannot_take_the_names_of_the_jobs_streams(name: str) -> None:
    with pytest.raises(UsageError, match="is fetched under that name"):
        check_output_name(name)


def test_an_image_chosen_by_name_is_verified_by_the_worker() -> None:
    """The name becomes a path in the script; --verify keeps the check a name gets from apppot start."""
    script = slurm.render_sbatch(JOB._replace(verify=True), Path("/stage"), "apppot")
    assert "--image /images/app.img --mem 1024M --verify --changes" in script
    assert "--verify" not in slurm.render_sbatch(JOB, Path("/stage"), "apppot")

"""`apppot submit` stages the command's own script, keeps execute bits, and checks at submit (and on a
dry run) what would otherwise fail on the worker: missing inputs, the script, --mem on a worker that
is this host. Through the CLI, with stand-ins for sbatch (tests/unit/test_submit_hostile.py's `home`);
the real Slurm and ARC run them in tests/integration/test_slurm.py and test_arc.py."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from apppot.cli import main
from apppot.spec import MIB
from apppot.submit import arc, slurm, worker
from apppot.submit.command_file import CommandFile
from apppot.submit.job import BatchJob
from tests.unit.test_submit_hostile import home, staged

__all__ = ["home"]  # the fixture, shared

LOCAL_CONF = "NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=2\nPartitionName=p Nodes=ALL\n"
REMOTE_CONF = "NodeName=DEFAULT CPUs=8\nNodeName=w[01-99] NodeAddr=10.0.0.[1-99]\n"


def submit(home: Path, *argv: str) -> int:
    return main(["submit", "--to", "slurm", "--image", str(home / "app.img"), *argv])


def script(home: Path, name: str = "run.sh", mode: int = 0o755) -> Path:
    path = home / "work" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\nwc -w < "$1" > result.txt\n')
    path.chmod(mode)
    return path


def job_dir(home: Path) -> Path:
    (stage,) = staged(home)
    return stage / "job"


@pytest.mark.parametrize("command", [["./run.sh", "data.in"], ["bin/run.sh"], ["sh", "run.sh"], ["python3", "bin/run.sh"]])
def test_the_commands_script_is_staged_with_its_mode(home: Path, command: list[str]) -> None:
    name = command[0] if "/" in command[0] else command[1]
    source = script(home, name.removeprefix("./"))
    assert submit(home, "--", *command) == 0
    copy = job_dir(home) / name.removeprefix("./")
    assert copy.read_bytes() == source.read_bytes() and stat.S_IMODE(copy.stat().st_mode) == 0o755


@pytest.mark.parametrize("command", [["sh", "-c", "./run.sh"], ["count-words", "run.sh"], ["sh", "made-by-the-job.sh"]])
def test_words_that_name_no_file_of_the_submit_directory_stage_nothing(home: Path, command: list[str]) -> None:
    script(home)
    assert submit(home, "--", *command) == 0
    assert list(job_dir(home).iterdir()) == []


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_missing_script_is_refused_at_submit_saying_to_pass_it(
    home: Path, dry_run: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert submit(home, *dry_run, "--", "./run.sh", "data.in") == 125
    out, err = capsys.readouterr()
    assert err.startswith("apppot: error: the command './run.sh' is not a file in") and "--input" in err
    assert err.count("\n") == 1 and out == "" and staged(home) == []


def test_a_script_outside_the_submit_directory_is_refused(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script(home, "../outside.sh")
    assert submit(home, "--", "../outside.sh") == 125
    err = capsys.readouterr().err
    assert "outside the submit directory" in err and err.count("\n") == 1 and staged(home) == []


@pytest.mark.parametrize("kind", ["link", "linked directory", "fifo", "directory"])
def test_a_script_that_is_not_a_regular_file_is_refused_not_followed(
    home: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    work = home / "work"
    secret = script(home, "../secret.sh")
    if kind == "link":
        (work / "run.sh").symlink_to(secret)
        command = "./run.sh"
    elif kind == "linked directory":
        (work / "bin").symlink_to(home)
        command = "bin/secret.sh"
    elif kind == "fifo":
        os.mkfifo(work / "run.sh")
        command = "./run.sh"
    else:
        (work / "run.sh").mkdir()
        command = "./run.sh"
    assert submit(home, "--", command) == 125  # a FIFO is refused before it is opened: no hang
    err = capsys.readouterr().err
    assert err.startswith(f"apppot: error: the command {command!r} cannot be staged:") and err.count("\n") == 1
    assert staged(home) == []


def test_an_input_of_the_scripts_name_is_the_one_staged(home: Path) -> None:
    script(home)
    (home / "other").mkdir()
    other = script(home, "../other/run.sh", mode=0o700)
    assert submit(home, "--input", str(other), "--", "./run.sh") == 0
    copy = job_dir(home) / "run.sh"
    assert copy.read_bytes() == other.read_bytes() and stat.S_IMODE(copy.stat().st_mode) == 0o700


@pytest.mark.parametrize("command", [["./run.sh"], ["sh", "run.sh"]])
def test_a_linked_script_given_as_input_is_staged_as_an_input(home: Path, command: list[str]) -> None:
    real = script(home, "../checkout/run.sh")
    (home / "work" / "run.sh").symlink_to(real)  # e.g. into a git checkout: --input follows it, on purpose
    assert submit(home, "--input", "run.sh", "--", *command) == 0
    assert (job_dir(home) / "run.sh").read_bytes() == real.read_bytes()


def test_a_dry_run_checks_the_inputs(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert submit(home, "--dry-run", "--input", "missing.dat", "--", "true") == 125
    out, err = capsys.readouterr()
    assert out == "" and "missing.dat is not a file" in err and err.count("\n") == 1


# --- ARC: the client uploads files without their modes; the wrapper restores the execute bits ----


def arc_job(command_file: CommandFile | None = None, executables: tuple[str, ...] = ()) -> BatchJob:
    return BatchJob(
        argv=("./run.sh", "data.in"),
        image=None,
        mem_bytes=256 * MIB,
        inputs=(Path("/u/data.in"),),
        command_file=command_file,
        executables=executables,
    )


def test_the_arc_wrapper_restores_execute_bits_and_the_xrsl_uploads_the_script(tmp_path: Path) -> None:
    job = arc_job(command_file=CommandFile("run.sh", Path("/u/run.sh"), True), executables=("tool", "run.sh"))
    assert '("data.in" "")("run.sh" "")' in arc.render_xrsl(job)
    wrapper = arc.render_wrapper(job)
    assert wrapper.splitlines()[4] == "chmod u+x -- tool run.sh || exit 125"  # after the runtime environment's check
    # The wrapper as ARC would run it: the uploaded files are not executable, apppot-start is a stand-in.
    for name in ("tool", "run.sh", "data.in"):
        (tmp_path / name).write_text("x\n")
        (tmp_path / name).chmod(0o644)
    start = tmp_path / "apppot-start"
    start.write_text('#!/bin/sh\nshift 5; test -x "$1" && echo "runs $1"\n')
    start.chmod(0o755)
    (tmp_path / "w.sh").write_text(wrapper)
    env = {"PATH": "/usr/bin:/bin", "APPPOT_START": str(start), "APPPOT_IMAGE": "img"}
    out = subprocess.run(["sh", "w.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert out.stdout == "runs ./run.sh\n", out.stderr
    assert not os.access(tmp_path / "data.in", os.X_OK)


def test_the_arc_wrapper_without_executables_has_no_chmod() -> None:
    assert "chmod u+x" not in arc.render_wrapper(arc_job())


def test_executable_inputs_are_recorded_at_submit(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script(home)
    (home / "work" / "data.in").write_text("a b\n")
    argv = ["submit", "--to", "arc", "--dry-run", "--input", "run.sh", "--input", "data.in", "--", "./run.sh", "data.in"]
    assert main(argv) == 0
    assert '("run.sh" "")("data.in" "")' in capsys.readouterr().out


# --- --mem against the worker's limits, where the worker is this host ----------------------------


def test_slurm_nodes_from_the_configuration() -> None:
    assert worker.slurm_nodes(LOCAL_CONF) == ["127.0.0.1"]
    assert worker.slurm_nodes("NodeName=a,b NodeHostname=h1\n# NodeName=x\n") == ["h1"]
    assert worker.slurm_nodes("NodeName=c1 CPUs=1\nNodeName=c2\n") == ["c1", "c2"]
    assert worker.slurm_nodes(REMOTE_CONF) is None  # a host list: not expanded, so not known
    assert worker.slurm_nodes("include /etc/slurm/nodes.conf\n") is None
    assert worker.slurm_nodes("") is None


def test_which_hosts_are_this_one() -> None:
    here = {"myhost", "myhost.example.org"}
    assert all(worker.is_this_host(h, here) for h in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "MyHost"))
    assert not any(worker.is_this_host(h, here) for h in ("10.0.0.1", "other", "localhost.evil.org"))
    assert worker.ce_is_this_host("https://localhost:8443/arex") and not worker.ce_is_this_host("https://ce.example.org/arex")
    assert not worker.ce_is_this_host(None) and not worker.ce_is_this_host("https://[bad/arex")


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_mem_beyond_this_host_is_refused_at_submit_when_the_worker_is_this_host(
    home: Path, dry_run: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = home / "slurm.conf"
    conf.write_text(LOCAL_CONF)
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert submit(home, *dry_run, "--mem", "100000G", "--", "true") == 125
    out, err = capsys.readouterr()
    assert err.startswith("apppot: error: the job's worker is this host, which would refuse it: --mem 102400000M is more")
    assert err.count("\n") == 1 and out == "" and staged(home) == []
    conf.write_text(REMOTE_CONF)  # workers this host cannot see: their apppot start decides (apppot status reports it)
    assert submit(home, *dry_run, "--mem", "100000G", "--", "true") == 0


def test_mem_beyond_the_map_count_is_said_at_submit_when_the_worker_is_this_host(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = home / "slurm.conf"
    conf.write_text(LOCAL_CONF)
    monkeypatch.setenv("SLURM_CONF", str(conf))
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    mem = f"{(limit * 4096 >> 20) + 64}M"  # just over what this host's vm.max_map_count covers
    assert submit(home, "--mem", mem, "--", "true") == 0
    out, err = capsys.readouterr()
    assert out == "slurm-42\n"
    assert err.startswith(f"apppot: the job's worker is this host: --mem {mem}: the guest gets") and err.count("\n") == 1


# --- a worker that refused the job: apppot status says why, with the fix ------------------------

REFUSAL = (
    "vm.max_map_count is 100: UML could map no useful guest memory; 'sudo sysctl -w vm.max_map_count=258048' allows --mem 1024M"
)


def finished_with(home: Path, code: int, stderr: bytes) -> Path:
    from tests.unit.test_submit_hostile import fake_slurm_job

    stage = fake_slurm_job(home, []).parent
    (stage / "stderr.txt").write_bytes(stderr)
    scontrol = home / "bin" / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho 'JobId=7 JobName=apppot JobState=FAILED Reason=NonZeroExitCode ExitCode={code}:0'\n")
    scontrol.chmod(0o755)
    return stage


def status_line(capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["status", "slurm-7"]) == 0
    out: str = capsys.readouterr().out
    return out


def test_status_says_what_the_worker_refused_and_the_fix(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    noise = b"the job's own stderr\n" * 10000 + b"apppot: error: forged earlier\n"
    finished_with(home, 125, noise + f"apppot: error: {REFUSAL}\n".encode())
    assert status_line(capsys) == f"slurm-7: FAILED, exit code 125 (AppPot could not run the job on the worker: {REFUSAL})\n"


def test_status_reads_no_link_and_prints_no_control_characters(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stage = finished_with(home, 125, b"apppot: error: bad \x1b[2Jthing\n")
    assert status_line(capsys) == "slurm-7: FAILED, exit code 125 (AppPot could not run the job on the worker: bad [2Jthing)\n"
    (stage / "stderr.txt").unlink()
    secret = home / "secret"
    secret.write_text("apppot: error: a secret of the user's\n")
    (stage / "stderr.txt").symlink_to(secret)
    assert "secret" not in status_line(capsys)
    (stage / "stderr.txt").unlink()
    assert status_line(capsys) == (
        "slurm-7: FAILED, exit code 125 (AppPot could not run the job (see stderr.txt: apppot fetch))\n"
    )


# --- status with the cluster down: said at once, or what it waits for ----------------------------


def test_controllers_from_the_configuration() -> None:
    assert slurm.controllers("SlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=16817\n") == [("127.0.0.1", 16817)]
    assert slurm.controllers("SlurmctldHost=c1\nSlurmctldHost=c2 # backup\n") == [("c1", 6817), ("c2", 6817)]
    assert slurm.controllers("ControlMachine=old\nSlurmctldPort=7000-7002\n") == [("old", 7000)]
    assert slurm.controllers("SlurmctldPort=x\nSlurmctldHost=a\n") == [] and slurm.controllers("") == []


def test_a_configuration_with_includes_or_no_regular_file_tells_nothing(tmp_path: Path) -> None:
    assert slurm.controllers("SlurmctldHost=n0\nInclude /etc/slurm/ports.conf\n") == []
    fifo = tmp_path / "slurm.conf"
    os.mkfifo(fifo)
    assert slurm.controller_refuses(fifo) is None  # not read: it would block


def test_a_slurm_conf_that_is_no_file_is_refused_at_once(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (home / "bin" / "sbatch").write_text("#!/bin/sh\nsleep 60\n")  # sbatch retries a missing slurm.conf for a minute
    monkeypatch.setenv("SLURM_CONF", str(home / "nonexistent.conf"))
    started = time.monotonic()
    assert submit(home, "--", "true") == 125
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert (
        err.startswith(f"apppot: error: SLURM_CONF names {home / 'nonexistent.conf'}, which is not a file")
        and err.count("\n") == 1
    )
    assert staged(home) == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_status_with_the_controller_down_says_so_at_once(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    finished_with(home, 0, b"")
    scontrol = home / "bin" / "scontrol"
    scontrol.write_text("#!/bin/sh\nsleep 60\n")  # what a real scontrol would do first: wait for the controller
    conf = home / "slurm.conf"
    conf.write_text(f"SlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={closed_port()}\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    started = time.monotonic()
    assert main(["status", "slurm-7"]) == 125
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.startswith("apppot: error: Slurm's controller (127.0.0.1:") and "refuses connections" in err
    assert err.count("\n") == 1


def test_status_says_what_it_waits_for(home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    finished_with(home, 0, b"")
    scontrol = home / "bin" / "scontrol"
    scontrol.write_text("#!/bin/sh\nsleep 3\necho 'JobId=7 JobState=COMPLETED ExitCode=0:0'\n")
    with socket.socket() as listening:  # a controller that accepts, then is slow
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        conf = home / "slurm.conf"
        conf.write_text(f"SlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={listening.getsockname()[1]}\n")
        monkeypatch.setenv("SLURM_CONF", str(conf))
        assert main(["status", "slurm-7"]) == 0
    out, err = capsys.readouterr()
    assert out == "slurm-7: COMPLETED, exit code 0 (the job exited with status 0)\n"
    assert err == "apppot: waiting for Slurm's controller (scontrol)...\n"
    assert err.count("\n") == 1


def test_submit_with_the_controller_down_says_so_at_once(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (home / "bin" / "sbatch").write_text("#!/bin/sh\nsleep 60\n")  # a real sbatch would wait for the controller
    conf = home / "slurm.conf"
    conf.write_text(f"SlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={closed_port()}\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    started = time.monotonic()
    assert submit(home, "--", "true") == 125
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.startswith("apppot: error: Slurm's controller (127.0.0.1:") and err.count("\n") == 1
    assert staged(home) == []

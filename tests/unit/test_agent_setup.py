"""What the agent sets up before the job (issue 15): the host name, the image's /etc/hostname (its
first line that is neither blank nor a comment, if that is a valid host name, else `apppot`), and
which of its mounts are there. Run under both shells the agent must work with (busybox sh, dash),
sourcing the agent as a library."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

AGENT = resources.files("apppot.guest").joinpath("apppot-init")
SHELLS = [s for s in ("/bin/busybox", "/bin/dash") if shutil.which(s)]
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
VALID = re.compile(rf"{LABEL}(\.{LABEL})*")  # RFC 1123: labels of letters, digits and inner '-', joined by '.'


def set_hostname(shell: str, hostname_file: Path, kernel: Path) -> subprocess.CompletedProcess[str]:
    """The agent's apppot_set_hostname on these files, its log on stderr."""
    argv = [shell, "sh"] if shell.endswith("busybox") else [shell]
    env = {"PATH": "/usr/bin:/bin", "AGENT": str(AGENT), "APPPOT_AGENT_LIBRARY": "1"}
    script = '. "$AGENT"; log() { printf "%s\\n" "$*" >&2; }; '
    script += f"HOSTNAME_FILE={hostname_file}; HOSTNAME_SET={kernel}; apppot_set_hostname"
    return subprocess.run([*argv, "-c", script], env=env, capture_output=True, text=True, timeout=10, check=True)


def chosen_name(shell: str, content: bytes | None, tmp_path: Path) -> tuple[str, str]:
    """(the name the agent gives the kernel, what it logged) for an /etc/hostname holding `content`."""
    hostname_file = tmp_path / "hostname"
    kernel = tmp_path / "kernel-hostname"
    hostname_file.unlink(missing_ok=True)
    kernel.write_text("")
    if content is not None:
        hostname_file.write_bytes(content)
    log = set_hostname(shell, hostname_file, kernel).stderr
    return kernel.read_text(), log


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("content", "expected", "warned"),
    [
        (b"apppot\n", "apppot", False),
        (b"lab-7.example.org\n", "lab-7.example.org", False),
        (b"node42", "node42", False),  # no final newline
        (b"# the lab's node\n\n   node42  \nother\n", "node42", False),
        (None, "apppot", False),  # no /etc/hostname
        (b"", "apppot", False),
        (b"\n\n# only a comment\n", "apppot", False),
        (b"bad_name!\n", "apppot", True),
        (b"two words\n", "apppot", True),
        (b"-dash\n", "apppot", True),
        (b"dash-\n", "apppot", True),
        (b"a..b\n", "apppot", True),
        (b"a.-b\n", "apppot", True),
        (b"$(reboot)\n", "apppot", True),
        (b"x" * 64 + b"\n", "x" * 64, False),
        (b"x" * 65 + b"\n", "apppot", True),
    ],
)
def test_the_host_name_is_the_images_first_name_line(
    shell: str, content: bytes | None, expected: str, warned: bool, tmp_path: Path
) -> None:
    name, log = chosen_name(shell, content, tmp_path)
    assert name == expected
    assert ("using apppot" in log) == warned, log


@pytest.mark.parametrize("shell", SHELLS)
def test_a_directory_or_fifo_as_etc_hostname_gives_apppot_without_waiting(shell: str, tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for name in ("dir", "fifo"):
        kernel = tmp_path / f"kernel-{name}"
        set_hostname(shell, tmp_path / name, kernel)
        assert kernel.read_text() == "apppot"


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab9-._ \t#", min_size=0, max_size=70))
def test_any_first_line_gives_a_valid_host_name(line: str) -> None:
    """Whatever the first line holds, the kernel gets the line itself if it is a valid name, else apppot."""
    shell = SHELLS[-1]
    with tempfile.TemporaryDirectory() as d:
        name, _ = chosen_name(shell, (line + "\n").encode(), Path(d))
    stripped = line.strip(" \t")
    if not stripped or stripped.startswith("#"):
        assert name == "apppot"
    elif VALID.fullmatch(stripped) and len(stripped) <= 64:
        assert name == stripped
    else:
        assert name == "apppot"


@pytest.mark.parametrize("shell", SHELLS)
def test_the_agent_tells_whether_its_mount_points_are_mounted(shell: str, tmp_path: Path) -> None:
    """After `mount -a` failed, the job still runs if only devpts failed (a kernel without it)."""
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "proc /proc proc rw 0 0\nhostfs /run/apppot hostfs ro 0 0\nhostfs /run/apppot-agent/out hostfs rw 0 0\n"
        "hostfs /home/user/job hostfs rw 0 0\n"
    )
    argv = [shell, "sh"] if shell.endswith("busybox") else [shell]
    env = {"PATH": "/usr/bin:/bin", "AGENT": str(AGENT), "APPPOT_AGENT_LIBRARY": "1"}
    for points, expected in [
        ("/run/apppot /run/apppot-agent/out /home/user/job", 0),
        ("/run/apppot", 0),
        ("/run/apppot /dev/pts", 1),
        ("/home/user", 1),
    ]:
        script = f'. "$AGENT"; PROC_MOUNTS={mounts}; apppot_mounted {points}'
        assert subprocess.run([*argv, "-c", script], env=env, timeout=10, check=False).returncode == expected, points
    script = f'. "$AGENT"; PROC_MOUNTS={tmp_path / "none"}; apppot_mounted /run/apppot'
    assert subprocess.run([*argv, "-c", script], env=env, timeout=10, check=False).returncode == 1


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("tty", ["0", "1"])
@pytest.mark.parametrize("command", ["-- echo ran", "-x", "--version"])
def test_a_first_word_like_an_option_is_not_found_with_a_terminal_too(shell: str, tty: str, command: str, tmp_path: Path) -> None:
    """The job `-- echo ran` names no program, also with --tty, where the agent runs the job under
    `setsid -c`, which would take the '--' (or -x, --version) as its own."""
    argv = [shell, "sh"] if shell.endswith("busybox") else [shell]
    env = {"PATH": "/usr/bin:/bin", "AGENT": str(AGENT), "APPPOT_AGENT_LIBRARY": "1"}
    script = f'. "$AGENT"; JOB={tmp_path}; A_UID=0; A_TTY={tty}; apppot_exec_job {command}'
    r = subprocess.run([*argv, "-c", script], env=env, capture_output=True, text=True, timeout=10, check=False)
    first = command.split()[0]
    assert (r.returncode, r.stdout, r.stderr) == (127, "", f"{first}: not found\n")


def agent_function(shell: str, path: Path, setup: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The agent sourced under shell with only the programs in path; setup, then what it calls."""
    argv = [shell, "sh"] if shell.endswith("busybox") else [shell]
    env = {"PATH": str(path), "AGENT": str(AGENT), "APPPOT_AGENT_LIBRARY": "1"}
    script = '. "$AGENT"; log() { printf "%s\\n" "$*" >&2; }; apppot_fail() { echo "refused: $*"; exit 125; }; '
    return subprocess.run([*argv, "-c", script + setup], env=env, capture_output=True, text=True, timeout=10, check=False)


@pytest.fixture
def tiny_tools(tmp_path: Path) -> Path:
    """What the tiny appliance has for the crash guard: busybox's applets, which have no cksum."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")
    tools = tmp_path / "bin"
    tools.mkdir()
    for applet in ("cat", "mkdir", "rm", "sync"):
        (tools / applet).symlink_to(busybox)
    return tools


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("source", ["meta-data", "user-data"])
def test_the_crash_guard_refuses_only_the_job_whose_boot_crashed(
    shell: str, source: str, tiny_tools: Path, tmp_path: Path
) -> None:
    """Each call is a boot whose job crashed (the mark stays); the guard refuses a job only right after its own
    crash (issue 16: with no cksum every key was empty and every job was taken for the crashed one)."""
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    mark = tmp_path / "disk" / "cloud-job.running"

    def boot(job: str) -> str:
        if source == "meta-data":  # a NoCloud seed: its instance id names the job
            (ctl / "meta-data").write_text(f"instance-id: apppot-{job}\nlocal-hostname: apppot\n")
        (ctl / "user-data").write_text(f"#apppot-job\nA_V=5\nset -- echo {job}\n")
        setup = f"CTL={ctl}; JOBFILE={ctl / 'user-data'}; CLOUD_MARK={mark}; apppot_cloud_guard && echo ran"
        r = agent_function(shell, tiny_tools, setup, tmp_path)
        assert "not found" not in r.stderr, r.stderr
        return r.stdout.strip()

    assert boot("a") == "ran"
    assert boot("b") == "ran"  # another job, after a crash of a
    assert boot("a") == "ran"
    assert boot("a").startswith("refused: this job's previous boot ended before the job did")
    assert boot("a") == "ran"  # booting once more retries


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("flags", "written"), [("0x8\n", "9\n"), ("0x1009\n", None), ("0x9\n", None)])
def test_the_loopback_is_brought_up_through_its_flags_alone(shell: str, flags: str, written: str | None, tmp_path: Path) -> None:
    """With no program at all (Debian appliances have neither ip nor ifconfig): IFF_UP added where it is not set."""
    lo = tmp_path / "flags"
    lo.write_text(flags)
    r = agent_function(shell, tmp_path / "no-programs", f"LO_FLAGS={lo}; apppot_loopback_up", tmp_path)
    assert (r.returncode, r.stderr, lo.read_text()) == (0, "", written or flags)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("content", [None, "", "garbage\n"])
def test_an_unreadable_loopback_is_one_log_line(shell: str, content: str | None, tmp_path: Path) -> None:
    lo = tmp_path / "flags"
    if content is not None:
        lo.write_text(content)
    r = agent_function(shell, tmp_path / "no-programs", f"LO_FLAGS={lo}; apppot_loopback_up", tmp_path)
    assert r.returncode == 0 and r.stderr.count("\n") == 1 and "no loopback" in r.stderr, r.stderr

"""The host's renderer and the guest agent's decoder agree, byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apppot.errors import UsageError
from apppot.protocol import (
    CHANGES_ARCHIVE,
    CHANGES_BASE,
    CHANGES_DELETE,
    CHANGES_PARAM,
    CTL_PARAM,
    FS_PARAM,
    JOB_FILE,
    JOB_PARAM,
    OUT_PARAM,
    PROTOCOL_VERSION,
    STATUS_FILE,
    STDIN_CHUNK,
    STDIN_END,
    STDIN_FILE,
    STDIN_LEFT,
    STDIN_POS,
    STDIN_READ,
    GuestJob,
    StdinMode,
    StreamMode,
    parse_count,
    parse_status,
    render_job_file,
    render_kernel_params,
)

AGENT = resources.files("apppot.guest").joinpath("apppot-init")
SHELLS = [s for s in ("/bin/busybox", "/bin/dash") if shutil.which(s)]

# Loads the job file the way apppot_main does (inside a function, after set -f),
# then prints the settings and each argument, each followed by a NUL byte.
LOAD = """
. "$AGENT"
CTL=$TEST_CTL
load() {
    set -f
    . "$CTL/job"
    printf '%s\\0' "$A_V" "$A_UID" "$A_GID" "$A_USER" "$A_GROUP" "$A_STDIN" "$A_STDOUT" \\
        "$A_STDERR" "$A_TTY" "$A_KEEP_COW" "$A_TERM" "$A_ROWS" "$A_COLS" "$A_NET" "$A_NET_UP" "$A_ARGV" "$@"
}
load
"""
SETTINGS = 16  # values LOAD prints before the arguments

TRICKY = (
    "plain",
    "two words",
    "'single' \"double\"",
    "$HOME `id` $(id) \\n",
    "new\nline",
    "tab\there",
    "ütf-8 ✓ 日本",
    "",
    "-",
    "--",
    "*",
    "~",
    "a'b'c''",
    "trailing newline\n\n",
)


def guest_load(shell: str, job: GuestJob, ctl_dir: Path) -> tuple[list[bytes], list[bytes]]:
    """(settings, arguments) as the agent sees them after sourcing the job file."""
    (ctl_dir / JOB_FILE).write_bytes(render_job_file(job))
    argv = [shell, "sh"] if shell.endswith("busybox") else [shell]
    env = {"PATH": "/usr/bin:/bin", "AGENT": str(AGENT), "APPPOT_AGENT_LIBRARY": "1", "TEST_CTL": str(ctl_dir)}
    out = subprocess.run([*argv, "-c", LOAD], env=env, capture_output=True, check=True).stdout
    assert out.endswith(b"\0")
    values = out.split(b"\0")[:-1]
    return values[:SETTINGS], values[SETTINGS:]


def job(argv: tuple[str, ...] | None) -> GuestJob:
    return GuestJob(argv=argv)


@pytest.mark.parametrize("shell", SHELLS)
def test_tricky_arguments_round_trip(shell: str, tmp_path: Path) -> None:
    _, args = guest_load(shell, job(TRICKY), tmp_path)
    assert args == [os.fsencode(a) for a in TRICKY]


@pytest.mark.parametrize("shell", SHELLS)
def test_a_thousand_arguments_over_64_kib_round_trip(shell: str, tmp_path: Path) -> None:
    argv = tuple(f"arg-{i}-" + "x" * 60 for i in range(1000))
    assert sum(len(a) for a in argv) > 64 * 1024
    _, args = guest_load(shell, job(argv), tmp_path)
    assert args == [a.encode() for a in argv]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(exclude_characters="\0", exclude_categories=["Cs"])), min_size=1, max_size=8))
def test_generated_arguments_round_trip(tmp_path_factory: pytest.TempPathFactory, argv: list[str]) -> None:
    ctl = tmp_path_factory.mktemp("ctl")
    assert guest_load(SHELLS[0], job(tuple(argv)), ctl)[1] == [a.encode() for a in argv]


@pytest.mark.parametrize("shell", SHELLS)
def test_settings_round_trip(shell: str, tmp_path: Path) -> None:
    full = GuestJob(
        argv=("id",),
        uid=1234,
        gid=4321,
        user="alice",
        group="lab",
        stdin=StdinMode.SPOOL,
        stdout=StreamMode.TTY,
        stderr=StreamMode.PIPE,
        interactive=True,
        term="xterm-256color",
        rows=30,
        cols=100,
        net="vec0",
        net_configured=True,
        keep_cow=True,
    )
    values, args = guest_load(shell, full, tmp_path)
    expected = [str(PROTOCOL_VERSION), "1234", "4321", "alice", "lab", "spool", "tty", "pipe", "1", "1"]
    assert values == [v.encode() for v in [*expected, "xterm-256color", "30", "100", "vec0", "1", "1"]]
    assert args == [b"id"]


@pytest.mark.parametrize("shell", SHELLS)
def test_without_a_command_the_arguments_stay_empty(shell: str, tmp_path: Path) -> None:
    values, args = guest_load(shell, job(None), tmp_path)
    assert values[15] == b"0" and args == []


def test_the_kernel_gets_three_words_without_a_dot() -> None:
    # No dot: the kernel passes them to init's environment instead of treating them as module parameters.
    assert render_kernel_params("/apppot/ctl", "/apppot/out", "/apppot/job") == [
        f"{CTL_PARAM}=/apppot/ctl",
        f"{OUT_PARAM}=/apppot/out",
        f"{JOB_PARAM}=/apppot/job",
    ]
    assert "." not in CTL_PARAM + OUT_PARAM + JOB_PARAM
    for ctl, job_path in (("/with space", "/apppot/job"), ("/apppot/ctl", '/a"b')):
        with pytest.raises(UsageError):
            render_kernel_params(ctl, "/apppot/out", job_path)


def test_the_agent_uses_the_hosts_names() -> None:
    # The names are defined once, in protocol.py; the agent must spell every one of them the same.
    agent = AGENT.read_text()
    for param in (CTL_PARAM, OUT_PARAM, JOB_PARAM, CHANGES_PARAM, FS_PARAM):
        assert f"{param}=*) {param}=" in agent, param
    for name in (STATUS_FILE, STDIN_READ, STDIN_LEFT, STDIN_POS):
        assert f'"$OUT/{name}"' in agent, name
    for name in (JOB_FILE, STDIN_END, STDIN_FILE, STDIN_CHUNK.format("$i"), CHANGES_ARCHIVE, CHANGES_DELETE, CHANGES_BASE):
        assert f"$CTL/{name}" in agent, name
    assert f"APPPOT_PROTOCOL={PROTOCOL_VERSION}\n" in agent


@pytest.mark.parametrize(
    "field,value",
    [("user", "two words"), ("group", "x;y"), ("term", "a b"), ("net", "eth0;x")],
)
def test_values_the_agent_cannot_use_are_refused(field: str, value: str) -> None:
    kwargs = {"argv": ("true",), field: value}
    with pytest.raises(UsageError):
        render_job_file(GuestJob(**kwargs))  # type: ignore[arg-type]


def test_nul_bytes_and_empty_commands_are_refused() -> None:
    with pytest.raises(UsageError, match="NUL"):
        render_job_file(job(("a\0b",)))
    with pytest.raises(UsageError, match="empty"):
        render_job_file(job(()))


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"0\n", 0),
        (b"255", 255),
        (b"7\n", 7),
        (b"256", None),
        (b"", None),
        (b"x", None),
        (b" 7", None),
        (b"\xff\xfe", None),
        (b"\xd9\xa3", None),  # an Arabic-Indic digit: str.isdigit would take it
        (b"00000000000000000000007", None),
        (b"-1", None),
    ],
)
def test_parse_status(data: bytes, expected: int | None) -> None:
    assert parse_status(data) == expected


def test_parse_count_is_bounded() -> None:
    assert parse_count(b"4\n", 4) == 4
    assert parse_count(b"5\n", 4) is None
    assert parse_count(b"9" * 40, 10**30) is None

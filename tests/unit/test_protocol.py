"""The host's renderer and the guest agent's decoder agree, byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apppot.errors import UsageError
from apppot.protocol import (
    ARGV_FILE,
    GuestJob,
    StdinMode,
    StreamMode,
    parse_status,
    render_guest_params,
)

AGENT = resources.files("apppot.guest").joinpath("apppot-init")
SHELLS = [s for s in ("/bin/busybox", "/bin/dash") if shutil.which(s)]

# Reads the words the way the agent does, decodes the command, and prints each
# argument followed by a NUL byte.
DECODE = """
. "$AGENT"
set -f
apppot_parse $WORDS
eval "set -- $(apppot_command_words)"
printf '%s\\0' "$@"
"""

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


def guest_decode(shell: str, job: GuestJob, ctl_dir: str) -> list[bytes]:
    rendered = render_guest_params(job)
    for name, data in rendered.files.items():
        with open(os.path.join(ctl_dir, name), "wb") as f:
            f.write(data)
    argv = [shell, "sh"] if shell.endswith("busybox") else [shell]
    env = {
        "PATH": "/usr/bin:/bin",
        "AGENT": str(AGENT),
        "APPPOT_AGENT_LIBRARY": "1",
        "WORDS": " ".join(rendered.params),
    }
    script = DECODE.replace('. "$AGENT"', f'. "$AGENT"\nCTL="{ctl_dir}"')
    out = subprocess.run([*argv, "-c", script], env=env, capture_output=True, check=True).stdout
    assert out.endswith(b"\0") or not job.argv
    return out.split(b"\0")[:-1]


def job(argv: tuple[str, ...]) -> GuestJob:
    return GuestJob(ctl_path="/apppot/ctl", job_path="/apppot/job", argv=argv)


@pytest.mark.parametrize("shell", SHELLS)
def test_tricky_arguments_round_trip(shell: str, tmp_path) -> None:
    decoded = guest_decode(shell, job(TRICKY), str(tmp_path))
    assert decoded == [os.fsencode(a) for a in TRICKY]


@pytest.mark.parametrize("shell", SHELLS)
def test_long_command_spills_to_a_file_and_round_trips(shell: str, tmp_path) -> None:
    argv = tuple(f"arg-{i}-" + "x" * 60 for i in range(1000))  # over 64 KiB
    assert sum(len(a) for a in argv) > 64 * 1024
    rendered = render_guest_params(job(argv))
    assert f"apppot.argvfile={ARGV_FILE}" in rendered.params
    assert guest_decode(shell, job(argv), str(tmp_path)) == [a.encode() for a in argv]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(exclude_characters="\0", exclude_categories=["Cs"])), min_size=1, max_size=8))
def test_generated_arguments_round_trip(tmp_path_factory, argv: list[str]) -> None:
    ctl = tmp_path_factory.mktemp("ctl")
    assert guest_decode(SHELLS[0], job(tuple(argv)), str(ctl)) == [a.encode() for a in argv]


def test_short_command_stays_on_the_command_line() -> None:
    rendered = render_guest_params(job(("echo", "hi")))
    assert rendered.files == {}
    assert any(p.startswith("apppot.argv=") for p in rendered.params)


def test_rendered_parameters_are_single_words() -> None:
    full = GuestJob(
        ctl_path="/apppot/ctl",
        job_path="/apppot/job",
        argv=TRICKY,
        uid=1234,
        gid=1234,
        user="alice",
        group="lab",
        stdin=StdinMode.SPOOL,
        stdout=StreamMode.TTY,
        stderr=StreamMode.PIPE,
        interactive=True,
        term="xterm-256color",
        rows=30,
        cols=100,
        net=True,
    )
    params = render_guest_params(full).params
    assert params[0] == "apppot.v=1"
    assert all(" " not in p and "\n" not in p and '"' not in p for p in params)
    assert "apppot.tty=1" in params and "apppot.net=1" in params and "apppot.rows=30" in params


@pytest.mark.parametrize(
    "field,value",
    [("user", "two words"), ("group", "x;y"), ("term", "a b"), ("job_path", "/with space")],
)
def test_values_that_would_break_the_command_line_are_refused(field: str, value: str) -> None:
    kwargs = {"ctl_path": "/apppot/ctl", "job_path": "/apppot/job", "argv": ("true",), field: value}
    with pytest.raises(UsageError):
        render_guest_params(GuestJob(**kwargs))  # type: ignore[arg-type]


def test_nul_bytes_and_empty_commands_are_refused() -> None:
    with pytest.raises(UsageError, match="NUL"):
        render_guest_params(job(("a\0b",)))
    with pytest.raises(UsageError, match="empty"):
        render_guest_params(job(()))


@pytest.mark.parametrize("text,expected", [("0\n", 0), ("255", 255), ("7\n", 7), ("256", None), ("", None), ("x", None)])
def test_parse_status(text: str, expected: int | None) -> None:
    assert parse_status(text) == expected

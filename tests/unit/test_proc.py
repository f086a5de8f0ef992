"""Helper programs are found where a plain user's PATH does not look."""

from __future__ import annotations

import os

import pytest

from apppot.proc import run, which


@pytest.mark.skipif(not os.path.exists("/usr/sbin/mkfs.ext4"), reason="e2fsprogs is not installed here")
def test_tools_in_sbin_are_found_with_a_plain_users_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # A plain user's PATH (/usr/local/bin:/usr/bin:/bin) lacks /usr/sbin, where Debian keeps mkfs.ext4:
    # `apppot image build-tiny` said "mkfs.ext4 is not installed" though it was.
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    assert which("mkfs.ext4") == "/usr/sbin/mkfs.ext4"
    assert run(["mkfs.ext4", "-V"], check=False).returncode == 0


def test_a_missing_program_is_still_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert which("apppot-no-such-program") is None


def test_a_slow_helper_is_said_once_and_a_quick_one_never(capsys: pytest.CaptureFixture[str]) -> None:
    # `apppot status` with the cluster down waited 18 s for scontrol without a word (issue 16).
    run(["true"], slow="Slurm's controller (scontrol)")
    assert capsys.readouterr().err == ""
    run(["sleep", "2.4"], slow="Slurm's controller (scontrol)")
    assert capsys.readouterr().err == "apppot: waiting for Slurm's controller (scontrol)...\n"

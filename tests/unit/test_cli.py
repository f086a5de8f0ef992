"""Parsing `apppot start`: seed syntax, the command, sizes and memory checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from apppot.cli import parse_start
from apppot.errors import HostError, UsageError
from apppot.spec import DEFAULT_MEM, FALLBACK_MEM, MIB, choose_mem, map_count_needed, parse_mem


def test_command_after_double_dash_is_kept_verbatim() -> None:
    spec = parse_start(["--image", "a.img", "--", "sh", "-c", "echo --image"])
    assert spec.argv == ("sh", "-c", "echo --image")
    assert spec.image == Path("a.img")


def test_seed_style_command_without_double_dash() -> None:
    spec = parse_start(["--apppot", "./apppot_a3d.img", "/bin/bash"])
    assert spec.argv == ("/bin/bash",)
    assert spec.image == Path("./apppot_a3d.img")


@pytest.mark.parametrize("value", ["a3d.img.cow,/share/a3d.img", "a3d.img.cow:/share/a3d.img"])
def test_seed_cow_and_image(value: str) -> None:
    spec = parse_start(["--appot", value])
    assert spec.cow == Path("a3d.img.cow")
    assert spec.image == Path("/share/a3d.img")
    assert spec.argv is None


def test_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPPOT_IMAGE", "/images/x.img")
    monkeypatch.setenv("APPPOT_MEM", "1G")
    spec = parse_start(["--", "true"])
    assert spec.image == Path("/images/x.img")
    assert spec.mem_bytes == 1024 * MIB


def test_repeatable_extra_and_names() -> None:
    spec = parse_start(["--extra", "a=1", "--extra", "b", "--user", "alice", "--group", "lab", "--no-net", "--", "id"])
    assert spec.extra == ("a=1", "b")
    assert (spec.user, spec.group, spec.net) == ("alice", "lab", False)


def test_unknown_option_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unrecognized arguments"):
        parse_start(["--frobnicate", "--", "true"])


@pytest.mark.parametrize("text,size", [("512M", 512 * MIB), ("2G", 2048 * MIB), ("65536K", 64 * MIB), ("300", 300 * MIB)])
def test_parse_mem(text: str, size: int) -> None:
    assert parse_mem(text) == size


@pytest.mark.parametrize("text", ["lots", "12T", "1M"])
def test_bad_mem(text: str) -> None:
    with pytest.raises(UsageError):
        parse_mem(text)


def test_default_memory_follows_max_map_count() -> None:
    assert choose_mem(None, 1 << 20) == DEFAULT_MEM
    assert choose_mem(None, 65530) == FALLBACK_MEM


def test_too_small_max_map_count_names_the_fix() -> None:
    with pytest.raises(HostError, match=r"sudo sysctl -w vm.max_map_count=\d+"):
        choose_mem(2048 * MIB, 65530)
    assert choose_mem(2048 * MIB, map_count_needed(2048 * MIB)) == 2048 * MIB

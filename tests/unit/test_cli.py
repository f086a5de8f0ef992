"""Parsing `apppot start`: seed syntax, the command, sizes and memory checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from apppot.cli.common import print_record, print_table
from apppot.cli.start import _fast_parse, _start_parser, parse_start
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
    assert spec.cpu is None
    monkeypatch.setenv("APPPOT_CPU", "all")
    assert parse_start(["--", "true"]).cpu == "all"
    assert parse_start(["--cpu", "3", "--", "true"]).cpu == "3"


def test_repeatable_extra_and_names() -> None:
    spec = parse_start(["--extra", "a=1", "--extra", "b", "--user", "alice", "--group", "lab", "--no-net", "--", "id"])
    assert spec.extra == ("a=1", "b")
    assert (spec.user, spec.group, spec.net) == ("alice", "lab", False)


@pytest.mark.parametrize(
    "before",
    [
        [],
        ["--image", "a.img", "--mem", "1G", "--net", "-v"],
        ["--image=a.img", "--cow=c.cow", "--jobdir", "/tmp", "--console-log", "log"],
        ["--apppot", "c,i", "--uml", "/k", "--id", "x", "--extra", "a=1", "--extra=b", "--isolation", "strict"],
        ["--no-net", "--user", "root", "--group", "g", "--verbose"],
        ["--linux", "/k"],
        ["--cpu", "1", "--cpu=all"],
    ],
)
def test_fast_parser_reads_what_argparse_reads(before: list[str]) -> None:
    fast = _fast_parse(before)
    assert fast is not None
    assert vars(fast) == vars(_start_parser("apppot start").parse_args(before))


@pytest.mark.parametrize(
    "before",
    [
        ["-h"],
        ["--ima", "x"],
        ["--mem"],
        ["--mem", "--net"],
        ["--net", "--no-net"],
        ["--isolation", "loose"],
        ["--net=1"],
        ["stray"],
    ],
)
def test_fast_parser_leaves_the_unusual_to_argparse(before: list[str]) -> None:
    assert _fast_parse(before) is None


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


HOST = 16 * 1024 * MIB


def test_default_memory_follows_max_map_count() -> None:
    assert choose_mem(None, 1 << 20, HOST).bytes == DEFAULT_MEM
    assert choose_mem(None, 65530, HOST).bytes == FALLBACK_MEM


def test_too_small_max_map_count_gives_the_guest_what_it_can_map_with_a_warning_naming_the_fix() -> None:
    # Measured: a guest process that maps more pages than vm.max_map_count allows does not fail an
    # allocation, it spins for ever (UML retries the fault). So the guest gets what the host can map.
    mem, warning = choose_mem(512 * MIB, 65530, HOST)  # what seed-style clients pass, on a stock host
    assert mem == 271 * MIB and map_count_needed(mem) <= 65530 < map_count_needed(mem + MIB)
    assert warning is not None and "\n" not in warning and "271M" in warning
    assert re.search(r"sudo sysctl -w vm.max_map_count=\d+", warning)
    assert choose_mem(2048 * MIB, map_count_needed(2048 * MIB), HOST) == (2048 * MIB, None)


def test_a_max_map_count_too_low_for_any_useful_guest_is_refused_naming_the_fix() -> None:
    with pytest.raises(HostError, match=r"sudo sysctl -w vm.max_map_count=\d+"):
        choose_mem(512 * MIB, 2000, HOST)


def test_more_memory_than_the_host_has_is_refused_with_a_value_the_kernel_accepts() -> None:
    with pytest.raises(HostError, match=r"--mem 102398976M is more than this host's memory \(16384M\)") as caught:
        choose_mem(parse_mem("99999G"), 65530, HOST)
    assert "max_map_count" not in str(caught.value)
    # Anything up to the host's memory needs a vm.max_map_count the kernel takes (at most INT_MAX).
    assert map_count_needed(1 << 40) <= 2**31 - 1


def test_host_loopback_implies_the_network_and_refuses_no_net(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPPOT_HOST_LOOPBACK", raising=False)
    spec = parse_start(["--host-loopback", "--", "true"])
    assert (spec.net, spec.host_loopback) == (True, True)
    assert (parse_start(["--", "true"]).net, parse_start(["--", "true"]).host_loopback) == (None, False)
    monkeypatch.setenv("APPPOT_HOST_LOOPBACK", "1")
    assert parse_start(["--net", "--", "true"]).host_loopback is True
    with pytest.raises(UsageError, match="--host-loopback needs the network: drop --no-net"):
        parse_start(["--no-net", "--", "true"])


def test_help_lists_every_option() -> None:
    # An empty mutually exclusive group made argparse's usage line raise ValueError.
    text = _start_parser("apppot start").format_help()
    for flag in ("--unsafe-jobdir", "--host-loopback", "--net", "--no-net", "--kvm", "--no-kvm", "--cow"):
        assert flag in text, flag


def test_a_record_shows_an_unknown_value_as_a_table_does(capsys: pytest.CaptureFixture[str]) -> None:
    print_record({"built": None, "ok": False, "n": 0}, as_json=False)
    print_table([{"name": "tiny", "built": None}], ["name", "built"])
    assert capsys.readouterr().out.splitlines() == ["built: -", "ok: no", "n: 0", "name  built", "tiny  -"]
    print_record({"built": None}, as_json=True)
    assert capsys.readouterr().out == '{"built": null}\n'

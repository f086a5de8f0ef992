"""--help and a bad option for every command and subcommand of apppot, apppot-start and apppot-snap,
found by walking their argparse parsers (a command added later is walked too)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from apppot import cli, snap

Main = Callable[[list[str]], int]
ENTRY_POINTS: dict[str, Main] = {"apppot": cli.main, "apppot-start": cli.start_main, "apppot-snap": snap.main}
# README: 125 for apppot's own usage errors; apppot-snap, a tool inside images, exits 2 as argparse does.
BAD_OPTION_STATUS = {"apppot": 125, "apppot-start": 125, "apppot-snap": 2}


def _run(main: Main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's --help
        return int(e.code or 0)


def _parser_of(main: Main, argv: list[str], prog: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser named prog that main builds for argv (caught as it parses: nothing runs)."""
    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    class Stop(Exception):
        pass

    def record(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        if self.prog != prog:  # a parser on the way, e.g. apppot's own for the subcommand's name
            return original(self, *args, **kwargs)
        seen.append(self)
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", record)
        with contextlib.suppress(Stop):
            main([*argv, "--help"])
    assert len(seen) == 1, f"{prog}: no parser"
    return seen[0]


def _walk_parser(name: str, path: list[str], parser: argparse.ArgumentParser) -> Iterator[tuple[str, list[str]]]:
    yield name, path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _walk_parser(name, [*path, sub], subparser)


def _walk(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for name, main in ENTRY_POINTS.items():
        top = _parser_of(main, [], name, monkeypatch)
        found += _walk_parser(name, [], top)
        # apppot's subcommands are a choice of its own parser, each with a parser of its own
        commands = next((a.choices for a in top._actions if a.dest == "subcommand"), None) or []
        for command in commands:
            found += _walk_parser(name, [command], _parser_of(main, [command], f"{name} {command}", monkeypatch))
    return found


def test_the_walk_finds_the_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    walked = {(name, " ".join(path)) for name, path in _walk(monkeypatch)}
    # A sample, so that a walk finding nothing fails; the list checked below is the walk's own.
    assert {("apppot", "start"), ("apppot", "image export"), ("apppot", "changes show"), ("apppot-snap", "merge")} <= walked
    assert len(walked) > 25


def test_every_command_has_help_and_refuses_a_bad_option(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failures = []
    for name, path in _walk(monkeypatch):
        main = ENTRY_POINTS[name]
        capsys.readouterr()
        status = _run(main, [*path, "--help"])
        out, err = capsys.readouterr()
        if status != 0 or "usage:" not in out or err:
            failures.append(f"{name} {' '.join(path)} --help: status {status}, stdout {out[:80]!r}, stderr {err!r}")
        status = _run(main, [*path, "--no-such-option"])
        out, err = capsys.readouterr()
        lines = err.splitlines()
        if status != BAD_OPTION_STATUS[name] or len(lines) != 1 or "error" not in err or "Traceback" in err:
            failures.append(f"{name} {' '.join(path)} --no-such-option: status {status}, stderr {err!r}")
    assert failures == []

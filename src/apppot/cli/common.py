"""What every command's parser and output share: one-line usage errors, records, tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn

from apppot.errors import UsageError

if TYPE_CHECKING:
    import argparse


def parser_class() -> type[argparse.ArgumentParser]:
    """argparse's parser, raising instead of exiting, so errors take the usual one-line path."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise UsageError(f"{message} (see {self.prog} --help)")

    return Parser


def print_record(record: Mapping[str, object], as_json: bool) -> None:
    """One `key: value` line each, an unknown (None or empty) value as '-' as in tables; or JSON, where it is null."""
    if as_json:
        import json

        print(json.dumps(record))
    else:
        for key, value in record.items():
            print(f"{key}: {shown(value)}")


UNKNOWN = "-"  # how a record or table shows a value AppPot does not know


def shown(value: object) -> str:
    """A value as a person reads it: never Python's None, True, False, '' or a list's repr."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        value = ", ".join(shown(v) for v in value)
    return UNKNOWN if value is None or value == "" else str(value)


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    if not rows:
        print("no images in the cache (apppot image build RECIPE.toml, apppot image build-tiny)")
        return
    cells = [[shown(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def human(size: int) -> str:
    """2147483648 -> '2.0G'."""
    value = float(size)
    for unit in ("B", "K", "M"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"

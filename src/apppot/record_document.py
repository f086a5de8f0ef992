"""The provenance record's document: its schema (versioned by its "schema" field), and its assembly (pure).

README.md, "Provenance records", says what each field means. A change that removes or retypes a
field, or changes its meaning, is a new schema version; a field may be added within one.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

SCHEMA = "apppot-record/1"


class Optional(NamedTuple):
    """A field whose value may be null (None): AppPot did not get so far, or could not read it."""

    shape: object


class ListOf(NamedTuple):
    item: object


OptStr = Optional(str)
_COMMAND = {"argv": Optional(ListOf(str)), "source": str}
_KERNEL = {
    "path": str,
    "sha256": OptStr,
    "found_by": str,
    "release": OptStr,
    "config_sha256": OptStr,
    "source_package": OptStr,
    "seccomp": Optional(bool),
    "initrd": Optional({"path": str, "sha256": OptStr}),
}
_IMAGE_RECORD = {
    "name": str,
    "recipe_id": OptStr,
    "content_id": OptStr,
    "base_id": OptStr,
    "distribution": OptStr,
    "suite": OptStr,
    "built": OptStr,
    "packages": ListOf(str),
}
# Every field, always present (null where unknown), with its type: the schema the tests hold records to.
SHAPE: dict[str, object] = {
    "schema": str,
    "apppot": {"version": str},
    "host": {"name": str, "release": str, "machine": str, "uid": int},
    "backend": {"name": OptStr, "asked": OptStr, "asked_by": OptStr, "accel": OptStr, "why": OptStr},
    "kernel": Optional(_KERNEL),
    "image": {
        "path": OptStr,
        "content_id": OptStr,
        "came_by": str,
        "record": Optional(_IMAGE_RECORD),
        "matches_record": Optional(bool),
        "installed": Optional(ListOf(str)),
    },
    "changes": Optional(
        {
            "path": str,
            "sha256": OptStr,
            "base_id": OptStr,
            "members": Optional(int),
            "deleted": Optional(int),
            "merged_automatically": bool,
        }
    ),
    "cow": Optional({"path": str}),
    "writable_image": bool,
    "command": Optional(_COMMAND),
    "job_dir": OptStr,
    "memory": {"asked_bytes": Optional(int), "bytes": Optional(int)},
    "cpu": {"asked": OptStr, "pinned": Optional(int)},
    "network": {"enabled": Optional(bool), "host_loopback": bool},
    "started": str,
    "ended": str,
    "wall_seconds": float,
    "exit": {"status": int, "meaning": str, "reason": OptStr, "signal": OptStr},
}
MEANINGS = ("job", "guest-died", "apppot-error", "stopped", "output-closed")
COMMAND_SOURCES = ("argv", "job-directory", "image-autorun", "shell", "none")


class Outcome(NamedTuple):
    """How `apppot start` ended: its exit status and what that status means."""

    status: int
    meaning: str  # one of MEANINGS
    reason: str | None = None  # AppPot's one-line message, for guest-died and apppot-error
    signal: str | None = None  # the signal that stopped apppot start (meaning "stopped")


def utc(moment: datetime) -> str:
    """ISO 8601 in UTC, to the millisecond: 2026-12-04T10:15:02.123Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def assemble(
    sections: Mapping[str, Any], started: datetime, ended: datetime, wall_seconds: float, outcome: Outcome
) -> dict[str, Any]:
    """The document, fields in the schema's order; a section not in ``sections`` is null (unknown)."""
    doc: dict[str, Any] = {"schema": SCHEMA}
    for key in SHAPE:
        if key != "schema":
            doc[key] = sections.get(key)
    doc["started"], doc["ended"] = utc(started), utc(ended)
    doc["wall_seconds"] = round(wall_seconds, 3)
    doc["exit"] = outcome._asdict()
    return doc


def problems(value: object, shape: object = SHAPE, where: str = "") -> list[str]:
    """Where ``value`` departs from ``shape`` (SHAPE by default): missing or extra fields, wrong types."""
    if isinstance(shape, Optional):
        return [] if value is None else problems(value, shape.shape, where)
    if isinstance(shape, ListOf):
        if not isinstance(value, list):
            return [f"{where or '.'}: not a list"]
        return [p for i, item in enumerate(value) for p in problems(item, shape.item, f"{where}[{i}]")]
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{where or '.'}: not an object"]
        found = [f"{where}.{k}: missing" for k in shape if k not in value]
        found += [f"{where}.{k}: not in the schema" for k in value if k not in shape]
        return found + [p for k, sub in shape.items() if k in value for p in problems(value[k], sub, f"{where}.{k}")]
    assert isinstance(shape, type)
    ok = isinstance(value, shape) and not (shape is int and isinstance(value, bool))
    if shape is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    return [] if ok else [f"{where}: {type(value).__name__}, not {shape.__name__}"]

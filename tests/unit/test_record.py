"""The provenance record (apppot start --record): its schema, its file, and how each outcome is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from apppot.cli.start import parse_start
from apppot.errors import EXIT_APPPOT_ERROR, GuestDied, Interrupted, UsageError
from apppot.record import Recorder, RecordLost
from apppot.record_document import COMMAND_SOURCES, MEANINGS, SCHEMA, SHAPE, Outcome, assemble, problems
from apppot.record_facts import came_by, command, parse_dpkg_status
from apppot.record_file import RecordFile
from apppot.spec import JobSpec

HERE = Path(__file__).parent
GOLDEN = HERE / "record-golden.json"

# A fixed input: every section as a job on AppPot's kernel with a named image and a changes archive fills it.
SECTIONS = {
    "apppot": {"version": "0.1.0"},
    "host": {"name": "worker-1", "release": "6.1.0-41-amd64", "machine": "x86_64", "uid": 1000},
    "backend": {"name": "uml", "asked": "uml", "asked_by": "default", "accel": None, "why": "uml (default)"},
    "kernel": {
        "path": "/home/u/.cache/apppot/kernels/7.3.4-1_bpo13_1-10e1571e48e7/linux",
        "sha256": "e1" * 32,
        "found_by": "apppot",
        "release": "7.3.4",
        "config_sha256": "88" * 32,
        "source_package": "linux-source-7.3 7.3.4-1~bpo13+1",
        "seccomp": True,
        "initrd": None,
    },
    "image": {
        "path": "/home/u/.cache/apppot/images/debian-dev-0123456789abcdef.img",
        "content_id": "ab" * 32,
        "came_by": "name",
        "record": {
            "name": "debian-dev",
            "recipe_id": "01" * 32,
            "content_id": "ab" * 32,
            "base_id": "cd" * 32,
            "distribution": "debian",
            "suite": "bookworm",
            "built": "2026-12-01T10:00:00Z",
            "packages": ["build-essential", "python3"],
        },
        "matches_record": True,
        "installed": ["bash=5.2.15-2+b7", "gcc-12=12.2.0-14+deb12u1"],
    },
    "changes": {
        "path": "/home/u/job/apppot-changes.tar.gz",
        "sha256": "ef" * 32,
        "base_id": "cd" * 32,
        "members": 3,
        "deleted": 1,
        "merged_automatically": True,
    },
    "cow": None,
    "writable_image": False,
    "command": {"argv": ["sh", "-c", "exit 3"], "source": "argv"},
    "job_dir": "/home/u/job",
    "memory": {"asked_bytes": 536870912, "bytes": 536870912},
    "cpu": {"asked": "auto", "pinned": 1},
    "network": {"enabled": True, "host_loopback": False},
}
STARTED = datetime(2026, 12, 4, 10, 15, 2, 123000, tzinfo=UTC)
ENDED = datetime(2026, 12, 4, 10, 15, 4, 623000, tzinfo=UTC)


def golden_document() -> dict[str, object]:
    return assemble(SECTIONS, STARTED, ENDED, 2.5, Outcome(3, "job"))


def test_the_golden_document_is_built_from_a_fixed_input() -> None:
    text = json.dumps(golden_document(), indent=2) + "\n"
    if os.environ.get("APPPOT_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_the_golden_document_has_every_field_of_its_type() -> None:
    doc = golden_document()
    assert problems(doc) == []
    assert doc["schema"] == SCHEMA == "apppot-record/1"
    assert list(doc) == list(SHAPE)  # every field, in the schema's order
    assert doc["started"] == "2026-12-04T10:15:02.123Z" and doc["ended"] == "2026-12-04T10:15:04.623Z"


def _paths(shape: object, where: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(shape, dict):
        return [p for k, sub in shape.items() for p in [(*where, k), *_paths(sub, (*where, k))]]
    return [p for p in [getattr(shape, "shape", None)] if isinstance(p, dict) for p in _paths(p, where)]


@pytest.mark.parametrize("path", _paths(SHAPE), ids=".".join)
def test_a_missing_or_mistyped_field_is_found(path: tuple[str, ...]) -> None:
    for change in ("remove", "retype"):
        doc = json.loads(GOLDEN.read_text())
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if parent is None:
            continue
        if change == "remove":
            del parent[path[-1]]
        else:
            parent[path[-1]] = [object()]  # no field of the schema is a list of objects
        assert problems(doc), (change, path)


def test_an_unknown_field_and_unknown_sections_are_found() -> None:
    doc = golden_document()
    assert problems({**doc, "extra": 1}) == [".extra: not in the schema"]
    assert problems({**doc, "exit": {**doc["exit"], "status": True}}) == [".exit.status: bool, not int"]  # type: ignore[dict-item]
    unknown = assemble({}, STARTED, ENDED, 0.0, Outcome(125, "apppot-error", "why"))
    assert [p for p in problems(unknown) if "null" not in p] != []  # sections that are never null are found missing


def test_a_document_of_a_job_that_never_started_holds_nulls_only_where_allowed() -> None:
    spec = JobSpec(argv=("true",), jobdir=Path("/job"), record=Path("/x"))
    recorder = Recorder.__new__(Recorder)
    recorder.spec, recorder.decision, recorder.job, recorder.sections = spec, None, None, {}
    recorder.started, recorder.clock = STARTED, 0.0
    doc = recorder.document(Outcome(125, "apppot-error", "no image"))
    assert problems(doc) == []
    assert doc["kernel"] is None and doc["command"] == {"argv": ["true"], "source": "argv"}


# --- the outcome, as written ---------------------------------------------------------------------


def _record(tmp_path: Path, body: Callable[[Recorder], int]) -> tuple[int | BaseException, dict[str, Any] | None]:
    path = tmp_path / "rec" / "job.json"
    path.parent.mkdir(exist_ok=True)
    spec = JobSpec(argv=("true",), jobdir=tmp_path, record=path)
    said: list[str] = []
    recorder = Recorder(spec, said.append)
    result: int | BaseException
    try:
        result = recorder.run(body)
    except BaseException as e:  # the test looks at what was raised
        result = e
    doc = json.loads(path.read_text()) if path.exists() else None
    if doc is not None:
        assert problems(doc) == []
    return result, doc


def test_the_jobs_own_status_is_recorded_and_returned(tmp_path: Path) -> None:
    result, doc = _record(tmp_path, lambda r: 3)
    assert result == 3 and doc is not None
    assert doc["exit"] == {"status": 3, "meaning": "job", "reason": None, "signal": None}


def test_a_guest_that_died_is_recorded_with_its_reason_and_still_raised(tmp_path: Path) -> None:
    def body(_r: Recorder) -> int:
        raise GuestDied("the guest ended without reporting the job's status (UML killed by SIGKILL)")

    result, doc = _record(tmp_path, body)
    assert isinstance(result, GuestDied) and doc is not None
    assert doc["exit"]["status"] == 122 and doc["exit"]["meaning"] == "guest-died"
    assert "SIGKILL" in doc["exit"]["reason"]


def test_a_refusal_and_a_signal_before_the_job_are_recorded(tmp_path: Path) -> None:
    def refuse(_r: Recorder) -> int:
        raise UsageError("--kvm needs --backend qemu or auto")

    def stopped(_r: Recorder) -> int:
        raise Interrupted(15, "while preparing")

    _, doc = _record(tmp_path, refuse)
    assert doc is not None and doc["exit"] == {
        "status": 125,
        "meaning": "apppot-error",
        "reason": "--kvm needs --backend qemu or auto",
        "signal": None,
    }
    _, doc = _record(tmp_path, stopped)
    assert doc is not None and doc["exit"]["status"] == 143 and doc["exit"]["signal"] == "SIGTERM"
    assert doc["exit"]["meaning"] == "stopped"


def test_a_record_that_cannot_be_written_is_125_naming_the_jobs_status(tmp_path: Path) -> None:
    def job_removing_the_directory(r: Recorder) -> int:
        (tmp_path / "rec").rmdir()
        return 3

    result, doc = _record(tmp_path, job_removing_the_directory)
    assert doc is None
    assert isinstance(result, RecordLost) and result.exit_code == EXIT_APPPOT_ERROR
    assert "the job's status was 3" in str(result) and "rec/job.json" in str(result)


def test_a_lost_record_of_a_failed_start_tells_the_failure_first(tmp_path: Path) -> None:
    path = tmp_path / "rec" / "job.json"
    path.parent.mkdir()
    said: list[str] = []
    recorder = Recorder(JobSpec(argv=None, jobdir=tmp_path, record=path), said.append)

    def body(_r: Recorder) -> int:
        path.parent.rmdir()
        raise GuestDied("the guest ended without reporting the job's status")

    with pytest.raises(RecordLost, match="AppPot's status was 122"):
        recorder.run(body)
    assert said == ["error: the guest ended without reporting the job's status"]


# --- the file --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["link", "fifo", "directory", "device"])
def test_a_record_name_that_is_no_regular_file_is_refused_before_the_job(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "r.json"
    if kind == "link":
        (tmp_path / "elsewhere").write_text("keep")
        target.symlink_to(tmp_path / "elsewhere")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        target = Path("/dev/full")
    with pytest.raises(UsageError, match=r"--record .* is a "):
        RecordFile(target)


def test_a_file_that_is_not_a_record_is_never_replaced(tmp_path: Path) -> None:
    image = tmp_path / "app.img"
    image.write_bytes(b"\0" * 4096)
    with pytest.raises(UsageError, match="exists and is not an AppPot record"):
        RecordFile(image)
    earlier = tmp_path / "r.json"
    earlier.write_text(json.dumps(golden_document(), indent=2))
    RecordFile(earlier).close()  # an earlier record is replaced, and so is an empty file
    (tmp_path / "empty").write_bytes(b"")
    RecordFile(tmp_path / "empty").close()


def test_a_missing_directory_is_refused_before_the_job(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot use its directory .* create it"):
        RecordFile(tmp_path / "no" / "r.json")


def test_the_file_named_is_replaced_and_a_link_planted_later_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("")
    record = RecordFile(target)
    kept = tmp_path / "kept"
    kept.write_text("the user's")
    target.unlink()
    target.symlink_to(kept)  # planted between the check and the write (the job could, in its directory)
    record.write(b"{}\n")
    record.close()
    assert not target.is_symlink() and target.read_text() == "{}\n" and kept.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "r.json"]  # no temporary file left


def test_a_full_disk_leaves_no_partial_record(tmp_path: Path) -> None:
    """The write fails as on a full disk (a file size limit: EFBIG); the old record stays whole, no temporary left."""
    target = tmp_path / "r.json"
    target.write_text("")
    script = (
        "import resource, sys; from pathlib import Path; from apppot.record_file import RecordFile\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        "r = RecordFile(Path(sys.argv[1]))\n"
        "try:\n    r.write(b'x' * 1000)\nexcept OSError as e:\n    print(e.errno)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "27"  # EFBIG
    assert target.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


# --- the option and the facts --------------------------------------------------------------------


def test_record_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPPOT_RECORD", raising=False)
    assert parse_start(["--", "true"]).record is None
    assert parse_start(["--record", "a.json", "--", "true"]).record == Path("a.json")
    monkeypatch.setenv("APPPOT_RECORD", "env.json")
    assert parse_start(["--", "true"]).record == Path("env.json")
    assert parse_start(["--record=a.json", "true"]).record == Path("a.json")  # the option wins
    monkeypatch.setenv("APPPOT_RECORD", "")
    assert parse_start(["true"]).record is None
    seed = parse_start(["--apppot", "a.img", "--record", "r.json", "grep", "-c", "x"], "apppot-start")  # the seed's entry point
    assert (seed.record, seed.argv) == (Path("r.json"), ("grep", "-c", "x"))


def test_how_the_image_came(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local.img").write_bytes(b"")
    assert [came_by(t) for t in (None, "debian-dev", "local.img", "./x.img", "sha256:ab12")] == [
        "default",
        "name",
        "path",
        "path",
        "content-id",
    ]


def test_the_command_source_follows_the_agents_order(tmp_path: Path) -> None:
    spec = JobSpec(argv=None, jobdir=tmp_path)
    assert command(spec._replace(argv=("ls",)), tmp_path, None, False) == {"argv": ["ls"], "source": "argv"}
    assert command(spec, tmp_path, None, True)["source"] == "shell"
    assert command(spec, tmp_path, None, False)["source"] == "none"
    script = tmp_path / "apppot-run"
    script.write_text("#!/bin/sh\n")
    assert command(spec, tmp_path, None, False)["source"] == "none"  # not executable: the agent passes it over
    script.chmod(0o755)
    assert command(spec, tmp_path, None, False) == {"argv": ["./apppot-run"], "source": "job-directory"}
    assert set(COMMAND_SOURCES) >= {"argv", "job-directory", "image-autorun", "shell", "none"}
    assert "job" in MEANINGS


def test_installed_packages_are_read_from_dpkgs_status() -> None:
    status = (
        b"Package: gcc-12\nStatus: install ok installed\nVersion: 12.2.0-14\nDescription: x\n more: y\n\n"
        b"Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
        b"Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b7\n"
    )
    assert parse_dpkg_status(status) == ["bash=5.2.15-2+b7", "gcc-12=12.2.0-14"]
    assert parse_dpkg_status(b"\xff\x00garbage") == []


@pytest.mark.parametrize("entry", [{"packages": "bash=5"}, {"packages": [1, 2]}, {}, {"packages": []}])
def test_a_cache_entry_that_is_not_a_package_list_is_unknown(entry: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from apppot import hostcache
    from apppot.record_facts import installed_packages

    monkeypatch.setattr(hostcache, "cached", lambda kind, key, compute: entry)
    assert installed_packages(Path("/no/image"), "ab" * 32) is None

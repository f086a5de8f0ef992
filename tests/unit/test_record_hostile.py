"""What a job or another user can leave for the record to read: malformed image records, FIFOs, links, forged files."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from apppot.errors import ImageError
from apppot.images.store import ImageRecord
from apppot.record import Recorder
from apppot.record_document import problems
from apppot.spec import JobSpec

GOOD: dict[str, Any] = {
    "name": "app",
    "recipe": "/r/app.toml",
    "recipe_id": "01" * 32,
    "content_id": "ab" * 32,
    "agent": "cd" * 32,
    "protocol": 1,
    "distribution": "debian",
    "suite": "bookworm",
    "packages": ["bash"],
    "size_bytes": 1 << 30,
    "built": "2026-12-01T10:00:00Z",
    "build_seconds": 12.5,
    "base_id": "ef" * 32,
    "source_date_epoch": 1_700_000_000,
    "installed": ["bash=5.2.15-2+b2"],
}
WRONG = {
    "installed": [1],
    "source_date_epoch": "0",
    "packages": 5,
    "content_id": 5,
    "name": None,
    "protocol": "1",
    "size_bytes": True,
    "build_seconds": "x",
    "base_id": 1,
}


def test_a_good_image_record_parses(tmp_path: Path) -> None:
    assert ImageRecord.parse(json.dumps(GOOD).encode(), tmp_path / "a.json")._asdict() == GOOD
    older = {k: v for k, v in GOOD.items() if k not in ("source_date_epoch", "installed")}  # before reproducible builds
    assert ImageRecord.parse(json.dumps(older).encode(), tmp_path / "a.json").installed == ()
    assert ImageRecord.parse(json.dumps({**GOOD, "build_seconds": 12}).encode(), tmp_path / "a.json").build_seconds == 12


@pytest.mark.parametrize(("field", "value"), [*WRONG.items(), ("packages", ["bash", 5]), ("packages", "bash")])
def test_an_image_record_field_of_the_wrong_type_is_one_image_error_naming_it(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ImageError, match=rf"image record {tmp_path}/a.json is damaged \(.*{field}"):
        ImageRecord.parse(json.dumps({**GOOD, field: value}).encode(), tmp_path / "a.json")


@pytest.mark.parametrize("text", [b"[1]", b'"x"', b"5", b"null", b"\xff"])
def test_an_image_record_that_is_no_object_is_one_image_error(tmp_path: Path, text: bytes) -> None:
    with pytest.raises(ImageError, match="is damaged"):
        ImageRecord.parse(text, tmp_path / "a.json")


@pytest.mark.parametrize("kind", ["fifo", "link", "directory", "huge"])
def test_an_image_record_is_read_bounded_without_following_or_waiting(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "a.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link":
        (tmp_path / "real.json").write_text(json.dumps(GOOD))
        path.symlink_to(tmp_path / "real.json")
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b" " * (5 << 20) + json.dumps(GOOD).encode())
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(_read(path)), daemon=True)
    reader.start()
    reader.join(5)
    assert result and isinstance(result[0], ImageError), result  # not a hang, not the link's target
    assert str(path) in str(result[0])


def _read(path: Path) -> object:
    try:
        return ImageRecord.read(path)
    except ImageError as e:
        return e


def test_a_path_images_malformed_record_is_an_unknown_record_not_a_traceback(tmp_path: Path) -> None:
    from apppot.record_facts import _image_record

    image = tmp_path / "x.img"
    image.write_bytes(b"\0" * 4096)
    image.with_suffix(".json").write_text(json.dumps({**GOOD, "packages": 5}))
    assert _image_record(image) is None
    image.with_suffix(".json").unlink()
    os.mkfifo(image.with_suffix(".json"))
    assert _image_record(image) is None  # at once: a FIFO beside the image does not hang the start


# --- an unforeseen exception is recorded, then raised -------------------------------------------------


def test_an_unforeseen_exception_is_recorded_as_an_apppot_error_and_raised(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    recorder = Recorder(JobSpec(argv=("true",), jobdir=tmp_path, record=path), lambda _line: None)

    def body(_r: Recorder) -> int:
        raise TypeError("'int' object is not iterable")

    with pytest.raises(TypeError):
        recorder.run(body)
    doc = json.loads(path.read_text())
    assert problems(doc) == []
    assert doc["exit"]["status"] == 125 and doc["exit"]["meaning"] == "apppot-error"
    assert "TypeError" in doc["exit"]["reason"] and "not iterable" in doc["exit"]["reason"]


def test_the_cli_says_an_unforeseen_exception_in_one_line_with_125(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import apppot.cli as cli

    def broken(*_args: object) -> int:
        raise AttributeError("'int' object has no attribute 'startswith'")

    monkeypatch.setattr(cli, "cmd_start", broken)
    assert cli.main(["start", "--", "true"]) == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("apppot: error: an unforeseen AttributeError at test_record_hostile.py:")
    assert "startswith" in err and "please report it" in err


# --- the changes section: what was merged, never the path hashed at the end ---------------------------


def test_the_changes_section_is_of_the_archive_merged_not_of_the_file_at_the_end(tmp_path: Path) -> None:
    from apppot.record_facts import changes
    from apppot.snap.checks import ArchiveInfo

    archive = tmp_path / "apppot-changes.tar.gz"
    archive.write_bytes(b"what the job left at its end")
    spec = JobSpec(argv=("true",), jobdir=tmp_path, changes=archive)
    merged = ArchiveInfo("cd" * 32, "2026-12-04T10:00:00Z", "apppot-snap 1", ["/opt/x"], ["/opt/a"], [], sha256="ef" * 32)
    section = changes(spec, None, merged)
    assert section is not None and section["sha256"] == "ef" * 32 and (section["members"], section["deleted"]) == (1, 1)
    unmerged = changes(spec, None, None)  # the job never got so far: nothing was read, nothing is claimed
    assert unmerged is not None and unmerged["sha256"] is None and unmerged["base_id"] is None


@pytest.mark.parametrize("text", ["sha256:deadbeef", "z"])
def test_a_cached_record_of_wrong_types_is_one_image_error_when_images_are_looked_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    from apppot.images import selection, store

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("APPPOT_IMAGE_PATH", str(tmp_path / "no-site"))
    store.images_dir().mkdir(parents=True)
    (store.images_dir() / "z-0123456789abcdef.img").write_bytes(b"\0" * 4096)
    (store.images_dir() / "z-0123456789abcdef.json").write_text(json.dumps({**GOOD, "name": "z", "content_id": 5}))
    with pytest.raises(ImageError, match="no image"):  # the damaged record hides its image, as any damaged record
        selection.choose_image(text)

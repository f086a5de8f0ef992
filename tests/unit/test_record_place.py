"""The --record file's place: a directory reached through a link the job left in the job directory is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from apppot.errors import UsageError
from apppot.record_file import RecordFile


def test_a_record_directory_that_is_a_link_in_the_job_directory_is_refused(tmp_path: Path) -> None:
    job, elsewhere = tmp_path / "job", tmp_path / "elsewhere"
    job.mkdir()
    elsewhere.mkdir()
    (job / "out").symlink_to(elsewhere)  # an earlier job: rmdir out && ln -s ... out
    with pytest.raises(UsageError, match=r"--record .*out/record.json: .*/job/out in the job directory is a symbolic link"):
        RecordFile(job / "out" / "record.json", job)
    (job / "deep").mkdir()
    (job / "deep" / "in").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="symbolic link"):
        RecordFile(job / "deep" / "in" / "r.json", job)
    assert list(elsewhere.iterdir()) == []


def test_a_record_directory_in_the_job_directory_named_by_another_path_is_checked_too(tmp_path: Path) -> None:
    job, elsewhere = tmp_path / "job", tmp_path / "elsewhere"
    job.mkdir()
    elsewhere.mkdir()
    (job / "out").symlink_to(elsewhere)
    (tmp_path / "alias").symlink_to(job)  # the user's own link to the job directory is followed; the job's is not
    with pytest.raises(UsageError, match="symbolic link"):
        RecordFile(tmp_path / "alias" / "out" / "r.json", job)


def test_a_record_directory_outside_the_job_directory_may_be_reached_through_the_users_links(tmp_path: Path) -> None:
    job, real = tmp_path / "job", tmp_path / "real"
    job.mkdir()
    real.mkdir()
    (tmp_path / "records").symlink_to(real)
    record = RecordFile(tmp_path / "records" / "r.json", job)
    record.write(b"{}\n")
    record.close()
    assert (real / "r.json").read_text() == "{}\n"
    (job / "out").mkdir()
    inside = RecordFile(job / "out" / "r.json", job)  # a real directory in the job directory
    inside.write(b"{}\n")
    inside.close()
    assert (job / "out" / "r.json").read_text() == "{}\n"

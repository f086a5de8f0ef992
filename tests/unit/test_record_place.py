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


def test_a_directory_on_the_way_that_may_only_be_searched_is_passed(tmp_path: Path) -> None:
    """As a plain user: /scratch (mode 0711) style directories on the way need no read permission."""
    import os
    import pwd
    import subprocess
    import sys

    from tests.conftest import TEST_USER, open_to_all

    if os.geteuid() != 0:
        pytest.skip("switches to the test user")
    try:
        user = pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.skip(f"no user {TEST_USER}")
    search_only = tmp_path / "scratch"
    (search_only / "mine").mkdir(parents=True)
    os.chown(search_only / "mine", user.pw_uid, user.pw_gid)
    open_to_all(tmp_path)
    search_only.chmod(0o711)
    script = (
        "import sys; from pathlib import Path; from apppot.record_file import RecordFile; RecordFile(Path(sys.argv[1])).close()"
    )
    as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", sys.executable, "-c", script]
    r = subprocess.run([*as_user, str(search_only / "mine" / "r.json")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr

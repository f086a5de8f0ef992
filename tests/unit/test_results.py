"""The fetch copier (apppot.submit.results) on a temporary tree a hostile job could have left."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from apppot.errors import UsageError
from apppot.submit import results
from tests.conftest import open_to_all


def unprivileged(function: Callable[[], None]) -> None:
    """Run function as it is (not root) or, under root, in a child as nobody: root ignores modes."""
    if os.geteuid() != 0:
        function()
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            function()
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path, int, int]]:
    """(job directory, user's directory, and a descriptor of each)."""
    job, mine = tmp_path / "job", tmp_path / "mine"
    job.mkdir()
    mine.mkdir()
    job_fd, mine_fd = os.open(job, os.O_RDONLY | os.O_DIRECTORY), os.open(mine, os.O_RDONLY | os.O_DIRECTORY)
    yield job, mine, job_fd, mine_fd
    os.close(job_fd)
    os.close(mine_fd)


def copy(tree: tuple[Path, Path, int, int], *names: str, limit: int = 1 << 20, replace: bool = False) -> results.CopyReport:
    return results.copy_results(tree[2], names, tree[3], limit=limit, replace=replace)


def test_regular_files_are_copied_with_their_times_and_without_set_id_bits(tree: tuple[Path, Path, int, int]) -> None:
    job, mine, *_ = tree
    (job / "sub" / "deeper").mkdir(parents=True)
    (job / "sub" / "deeper" / "r.txt").write_text("result\n")
    (job / "run").write_text("#!/bin/sh\n")
    os.chmod(job / "run", 0o4755)
    os.utime(job / "run", (1_000_000, 1_000_000))
    assert copy(tree, "sub/deeper/r.txt", "run", "absent.txt") == (["sub/deeper/r.txt", "run"], ["absent.txt"], [])
    assert (mine / "sub" / "deeper" / "r.txt").read_text() == "result\n"
    st = (mine / "run").stat()
    assert st.st_mtime == 1_000_000 and st.st_mode & stat.S_IXUSR and not st.st_mode & (stat.S_ISUID | stat.S_ISGID)


def test_links_are_refused_whether_they_point_at_files_directories_or_nothing(tree: tuple[Path, Path, int, int]) -> None:
    job, mine, *_ = tree
    secret = job.parent / "secret"
    secret.write_text("secret\n")
    (job / "file").symlink_to(secret)
    (job / "dir").symlink_to(job.parent)
    (job / "dangling").symlink_to("/nonexistent")
    report = copy(tree, "file", "dir/secret", "dangling")
    assert report.copied == [] and report.missing == []
    assert [(r.name, r.reason) for r in report.refused] == [
        ("file", "a symbolic link"),
        ("dir/secret", "'dir' on its path is a symbolic link"),
        ("dangling", "a symbolic link"),
    ]
    assert list(mine.iterdir()) == []


def test_fifos_sockets_devices_and_directories_are_refused_without_being_opened(tree: tuple[Path, Path, int, int]) -> None:
    job, mine, *_ = tree
    os.mkfifo(job / "fifo")  # opening it for reading would block: refused before any open
    (job / "dir").mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(job / "sock"))
        names = ["fifo", "dir", "sock"]
        if os.geteuid() == 0:
            os.mknod(job / "null", stat.S_IFCHR | 0o666, os.stat("/dev/null").st_rdev)
            names.append("null")
        report = copy(tree, *names)
    reasons = dict(report.refused)
    assert reasons.pop("fifo") == "a FIFO" and reasons.pop("dir") == "a directory" and reasons.pop("sock") == "a socket"
    assert reasons == ({"null": "a device file"} if "null" in names else {})
    assert list(mine.iterdir()) == []


def test_a_file_over_the_limit_is_refused_and_leaves_nothing(tree: tuple[Path, Path, int, int]) -> None:
    job, mine, *_ = tree
    with open(job / "huge", "wb") as f:
        f.truncate(1 << 40)  # a terabyte of holes: cheap for the job, not for the user's disk
    (job / "small").write_bytes(b"x" * 100)
    report = copy(tree, "huge", "small", limit=100)
    assert report.copied == ["small"] and [r.name for r in report.refused] == ["huge"]
    assert "larger than 100" in report.refused[0].reason
    assert sorted(p.name for p in mine.iterdir()) == ["small"]


def test_a_file_larger_than_the_free_space_is_refused(tree: tuple[Path, Path, int, int]) -> None:
    job, mine, *_ = tree
    free = os.statvfs(mine)
    with open(job / "sparse", "wb") as f:
        f.truncate(free.f_bavail * free.f_frsize + (1 << 30))
    report = copy(tree, "sparse", limit=1 << 62)
    assert report.refused[0].reason.endswith("more than the free space where it would go")
    assert list(mine.iterdir()) == []


def test_existing_files_are_kept_unless_replace_and_replace_never_writes_through_a_link(
    tree: tuple[Path, Path, int, int],
) -> None:
    job, mine, *_ = tree
    (job / "r.txt").write_text("new\n")
    (mine / "r.txt").write_text("mine\n")
    report = copy(tree, "r.txt")
    assert report.refused == [("r.txt", "already in your directory (fetch with --force to replace it)")]
    assert (mine / "r.txt").read_text() == "mine\n"
    (mine / "r.txt").unlink()
    outside = job.parent / "outside"
    outside.write_text("untouched\n")
    (mine / "r.txt").symlink_to(outside)
    assert copy(tree, "r.txt", replace=True).copied == ["r.txt"]
    assert outside.read_text() == "untouched\n" and (mine / "r.txt").read_text() == "new\n"
    assert sorted(p.name for p in mine.iterdir()) == ["r.txt"]  # no temporary file left


def test_a_link_in_the_users_directory_is_not_followed_to_make_subdirectories(tree: tuple[Path, Path, int, int]) -> None:
    job, mine, *_ = tree
    (job / "sub").mkdir()
    (job / "sub" / "r.txt").write_text("new\n")
    elsewhere = job.parent / "elsewhere"
    elsewhere.mkdir()
    (mine / "sub").symlink_to(elsewhere)
    report = copy(tree, "sub/r.txt", replace=True)
    assert report.refused and "in your directory is in the way" in report.refused[0].reason
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "./x", ""])
def test_names_that_leave_the_directory_are_refused(tree: tuple[Path, Path, int, int], name: str) -> None:
    assert copy(tree, name).refused == [(name, "not a plain relative path")]


def test_an_unreadable_file_is_refused_with_the_reason(tree: tuple[Path, Path, int, int]) -> None:
    job, mine, *_ = tree
    (job / "locked").write_text("x")
    os.chmod(job / "locked", 0)
    if os.geteuid() == 0:
        open_to_all(job.parent)
        for path in (job, mine):
            os.chown(path, 65534, 65534)

    def check() -> None:
        assert copy(tree, "locked").refused == [("locked", "Permission denied")]

    unprivileged(check)


@pytest.mark.parametrize(("text", "size"), [("4096", 4096), ("500M", 500 << 20), ("16g", 16 << 30), ("1T", 1 << 40)])
def test_sizes(text: str, size: int) -> None:
    assert results.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1", "12Q"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(UsageError, match="invalid size"):
        results.parse_size(text)

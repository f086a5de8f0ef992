"""Run directories: removed without following links or recursing, swept only when their AppPot is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apppot.rundir import LOCK, RunDir, remove_tree, sweep_stale
from tests.conftest import open_to_all

MAKE = "import os, sys, time; from pathlib import Path; from apppot.rundir import RunDir; RunDir(Path(sys.argv[1]))"


@pytest.fixture
def canary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    (home / "precious.txt").write_bytes(b"precious\n")
    (home / "sub").mkdir()
    (home / "sub" / "kept").write_bytes(b"kept\n")
    return home


def untouched(home: Path) -> bool:
    return (home / "precious.txt").read_bytes() == b"precious\n" and (home / "sub" / "kept").read_bytes() == b"kept\n"


def test_links_in_the_tree_are_removed_not_followed(tmp_path: Path, canary: Path) -> None:
    tree = tmp_path / "run"
    (tree / "out").mkdir(parents=True)
    (tree / "out" / "to-dir").symlink_to(canary)
    (tree / "out" / "to-file").symlink_to(canary / "precious.txt")
    (tree / "to-sub").symlink_to(canary / "sub")
    os.mkfifo(tree / "out" / "fifo")
    remove_tree(str(tree))
    assert not tree.exists() and untouched(canary)


def test_a_link_as_the_tree_itself_is_removed_not_followed(tmp_path: Path, canary: Path) -> None:
    (tmp_path / "run").symlink_to(canary)
    remove_tree(str(tmp_path / "run"))
    assert not (tmp_path / "run").is_symlink() and untouched(canary)


def test_any_depth_is_removed_without_recursion(tmp_path: Path) -> None:
    tree = tmp_path / "run"
    tree.mkdir()
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(5000):  # far beyond Python's recursion limit and the descriptor limit
        os.mkdir("d", dir_fd=fd)
        new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    remove_tree(str(tree))
    assert not tree.exists()


LOCKED = """
import os, sys
from apppot.rundir import remove_tree
tree = sys.argv[1]
os.makedirs(f"{tree}/out/locked/inner/deeper")
open(f"{tree}/out/locked/inner/deeper/f", "w").close()
open(f"{tree}/out/locked/f", "w").close()
os.chmod(f"{tree}/out/locked/inner/deeper", 0)
os.chmod(f"{tree}/out/locked/inner", 0o500)
os.chmod(f"{tree}/out/locked", 0o500)
os.chmod(f"{tree}/out", 0o500)
remove_tree(tree)
print("gone" if not os.path.lexists(tree) else "left")
"""


def test_directories_made_unreadable_or_read_only_are_removed(tmp_path: Path) -> None:
    # As an ordinary user: root would pass whatever the modes.
    open_to_all(tmp_path)
    tmp_path.chmod(0o777)
    user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"] if os.geteuid() == 0 else []
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([*user, sys.executable, "-c", LOCKED, str(tmp_path / "run")], env=env, capture_output=True, text=True)
    assert result.stdout == "gone\n", result.stderr


def test_a_names_taken_in_the_top_do_not_stop_the_removal(tmp_path: Path) -> None:
    tree = tmp_path / "run"
    (tree / ".apppot-rm-0" / "full").mkdir(parents=True)
    (tree / "x" / "y" / "z").mkdir(parents=True)
    remove_tree(str(tree))
    assert not tree.exists()


def test_a_held_run_directory_is_private_and_kept(tmp_path: Path) -> None:
    held = RunDir(tmp_path)
    assert held.path.stat().st_mode & 0o777 == 0o700
    assert sweep_stale(tmp_path) == [] and held.path.exists()
    held.release()
    assert not held.path.exists()


def test_a_run_directory_whose_apppot_was_killed_is_swept(tmp_path: Path) -> None:
    # A child makes a run directory and is killed with SIGKILL, as a killed AppPot would be.
    code = f"{MAKE}; os.kill(os.getpid(), 9)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    (left,) = tmp_path.iterdir()
    (left / "out").mkdir()
    (left / "out" / "status").write_bytes(b"0\n")
    assert sweep_stale(tmp_path) == [left.name]
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_held_by_a_running_apppot_is_not_swept(tmp_path: Path) -> None:
    code = f"{MAKE}; print(flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        (held,) = tmp_path.iterdir()
        assert sweep_stale(tmp_path) == [] and (held / LOCK).exists()
    finally:
        child.kill()
        child.wait()
    assert sweep_stale(tmp_path) == [held.name]


def test_other_names_and_links_are_left_alone(tmp_path: Path, canary: Path) -> None:
    (tmp_path / "apppot-1-link").symlink_to(canary)
    (tmp_path / "mine").mkdir()
    assert sweep_stale(tmp_path) == []
    assert untouched(canary) and (tmp_path / "mine").exists()


def test_a_users_own_directories_named_apppot_are_left_alone(tmp_path: Path) -> None:
    # Only a run directory's own name (apppot-PID-NNNNNNNNN-N) is ever swept: a benchmark's or the
    # user's directory that merely starts with "apppot-" is theirs.
    for name in ("apppot-bench-x1y2", "apppot-notes", "apppot-123", "apppot-99999999-1-2-extra"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_text("keep")
    assert sweep_stale(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["apppot-bench-x1y2", "apppot-notes", "apppot-123", "apppot-99999999-1-2-extra"]
    )


SWEEP_WHILE_MAKING = """
import sys, threading
from pathlib import Path
from apppot.rundir import sweep_stale
base = Path(sys.argv[1])
stop = threading.Event()
def sweep():
    while not stop.is_set():
        sweep_stale(base)
threading.Thread(target=sweep, daemon=True).start()
"""


def test_a_run_directory_being_made_is_never_swept_by_another_apppot(tmp_path: Path) -> None:
    # Another AppPot's sweep runs all the time in a second process; each directory made here must survive it.
    sweeper = subprocess.Popen(
        [sys.executable, "-c", SWEEP_WHILE_MAKING + "import time; time.sleep(60)", str(tmp_path)], stdout=subprocess.DEVNULL
    )
    try:
        for _ in range(600):
            held = RunDir(tmp_path)
            assert (held.path / LOCK).exists(), "a run directory was swept while it was being made"
            held.release()
    finally:
        sweeper.kill()
        sweeper.wait()

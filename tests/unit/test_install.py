"""make install-site: every release installs beside the one before, and the switch is one rename."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from apppot.install import install, path_note
from tests.conftest import TEST_USER, chown_to, open_to_all


def _version(launcher: Path) -> str:
    return subprocess.run([launcher, "--version"], capture_output=True, text=True, check=True).stdout


def test_an_upgrade_switches_the_release_in_one_link_and_keeps_the_one_before(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    launcher = install(prefix)
    lib = prefix / "lib" / "apppot"
    first = os.readlink(lib)
    assert lib.is_symlink() and (lib.parent / first / "apppot" / "__init__.py").is_file()
    assert "apppot" in _version(launcher)
    install(prefix)
    second = os.readlink(lib)
    assert second != first and (lib.parent / first).is_dir()  # a job still running the first keeps it
    install(prefix)
    assert not (lib.parent / first).exists() and (lib.parent / second).is_dir()
    assert "apppot" in _version(launcher)
    assert not [p.name for p in lib.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_launcher_resolves_the_release_once_so_a_switch_cannot_mix_two(tmp_path: Path) -> None:
    launcher = install(tmp_path / "prefix")
    header = launcher.read_text().split("from apppot", 1)[0]  # the launcher up to its import of AppPot
    probe = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", header + "print(sys.path[0])"], capture_output=True, text=True, check=True
    )
    resolved = Path(probe.stdout.strip())
    assert resolved.name.startswith("apppot-") and str(resolved) == os.path.realpath(tmp_path / "prefix" / "lib" / "apppot")


def test_an_install_from_before_releases_is_kept_aside_and_replaced(tmp_path: Path) -> None:
    old = tmp_path / "prefix" / "lib" / "apppot" / "apppot"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("")
    install(tmp_path / "prefix")
    lib = tmp_path / "prefix" / "lib" / "apppot"
    assert lib.is_symlink()
    kept = [p.name for p in lib.parent.iterdir() if p.name.startswith("apppot-before-")]
    assert len(kept) == 1


def test_the_install_says_how_to_run_apppot_when_its_directory_is_not_on_path(tmp_path: Path) -> None:
    bin_dir = tmp_path / "home" / ".local" / "bin"
    note = path_note(bin_dir, "/usr/local/bin:/usr/bin:/bin")
    assert note == (
        f"note: {bin_dir} is not on your PATH, so a bare 'apppot' is not found; run {bin_dir}/apppot, or add it "
        f'to PATH (e.g. in ~/.profile): export PATH="{bin_dir}:$PATH"'
    )
    assert path_note(bin_dir, f"/usr/bin:{bin_dir}:/bin") is None
    assert path_note(bin_dir, f"/usr/bin:{bin_dir}/:/bin") is None  # the same directory, written another way
    assert path_note(bin_dir, "") is not None


def test_the_install_prints_where_apppot_is_and_the_path_note(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run(
        ["/usr/bin/python3", "-m", "apppot.install", "--prefix", str(prefix)], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines() == [
        f"installed {prefix}/bin/apppot (and apppot-start, apppot-snap beside it)",
        path_note(prefix / "bin", "/usr/bin:/bin"),
    ]
    env["PATH"] = f"{prefix}/bin:/usr/bin:/bin"
    again = subprocess.run(
        ["/usr/bin/python3", "-m", "apppot.install", "--prefix", str(prefix)], env=env, capture_output=True, text=True, check=True
    )
    assert again.stdout.splitlines() == [f"installed {prefix}/bin/apppot (and apppot-start, apppot-snap beside it)"]


def test_an_install_removes_only_the_releases_it_made(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    notes = prefix / "lib" / "apppot-notes"  # a user's own directory beside the releases
    notes.mkdir(parents=True)
    (notes / "todo.txt").write_text("keep me\n")
    for _ in range(3):
        install(prefix)
    assert (notes / "todo.txt").read_text() == "keep me\n"
    assert len([p for p in (prefix / "lib").iterdir() if p.name.startswith("apppot-0")]) == 2  # the current and the one before


def test_an_old_release_that_cannot_be_removed_is_named_in_one_line(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("root leaves a release in the user's prefix")
    prefix = tmp_path / "prefix"
    old = prefix / "lib" / "apppot-0.0.1-1700000000000000000"  # root's install into the user's prefix
    (old / "apppot").mkdir(parents=True)
    (old / "apppot" / "__init__.py").write_text("")
    open_to_all(old / "apppot")
    chown_to(prefix, TEST_USER)
    chown_to(prefix / "lib", TEST_USER)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    argv = ["/usr/bin/python3", "-m", "apppot.install", "--prefix", str(prefix)]
    for _ in range(2):  # the second install is the one that removes what is older than the one before
        ran = subprocess.run(
            ["setpriv", f"--reuid={TEST_USER}", f"--regid={TEST_USER}", "--init-groups", "--", *argv],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,
        )
        assert ran.returncode == 0, ran.stderr
    assert old.is_dir()
    assert ran.stderr.splitlines() == [
        f"apppot install: note: cannot remove the old release {old} (Permission denied); remove it as its owner (or root)"
    ]


def _make_n(target: str, *args: str, env_prefix: str | None = None) -> str:
    """The command `make TARGET` would run (make -n prints it), with PREFIX exported or not."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/home/someone"}
    if env_prefix is not None:
        env["PREFIX"] = env_prefix  # as conda-build and Termux export it
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        ["make", "-n", "-C", str(root), target, *args], env=env, capture_output=True, text=True, check=True
    ).stdout


def test_make_install_takes_prefix_from_its_command_line_only() -> None:
    assert '--prefix "/home/someone/.local"' in _make_n("install")
    assert '--prefix "/home/someone/.local"' in _make_n("install", env_prefix="/opt/conda")
    assert '--prefix "/srv/apppot"' in _make_n("install", "PREFIX=/srv/apppot", env_prefix="/opt/conda")
    assert '--prefix "/usr/local"' in _make_n("install-site", env_prefix="/opt/conda")
    assert '--prefix "/opt/apppot"' in _make_n("install-site", "PREFIX=/opt/apppot")


def test_make_install_says_it_leaves_an_exported_prefix_alone() -> None:
    said = _make_n("install", env_prefix="/opt/conda")
    assert "PREFIX=/opt/conda in the environment is not used" in said
    assert "PREFIX=/opt/conda in the environment" not in _make_n("install", "PREFIX=/srv/apppot", env_prefix="/opt/conda")

"""The backend instances: what the runner gets from each, for one prepared job (no boot)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from apppot import cow
from apppot.backends.base import GuestFds, Prepared, RunPaths
from apppot.backends.qemu import Accel
from apppot.backends.qemu_instance import QemuInstance
from apppot.backends.uml_instance import SANDBOX_COW, SANDBOX_CTL, SANDBOX_OUT, UmlInstance
from apppot.errors import ImageError
from apppot.kernel import FoundKernel, KernelSource, KernelTraits
from apppot.protocol import StdinMode, StreamMode
from apppot.spec import JobSpec
from apppot.streams import Streams

TRAITS = KernelTraits(True, True, False, True, False, 4000)
STREAMS = Streams(StdinMode.SPOOL, StreamMode.PIPE, StreamMode.PIPE, False)
FDS = GuestFds(log=7, stdout=8, stderr=9, terminal=None)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _prepared(tmp_path: Path) -> Prepared:
    image = tmp_path / "image.ext4"
    image.write_bytes(b"\0" * 4096)
    jobdir = tmp_path / "job"
    jobdir.mkdir()
    return Prepared(image, "0f0f0f0f-1111-2222-3333-444444444444", jobdir, 256 << 20, None, "apppot-1")


def _paths(tmp_path: Path) -> RunPaths:
    run = tmp_path / "run"
    return RunPaths(run / "ctl", run / "out", run / "uml", run / "job.cow", run / "net")


def _rundir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    return run


def _pairs(argv: list[str], option: str) -> dict[str, str]:
    """bubblewrap's binds: target -> source, for one kind of bind."""
    return {argv[i + 2]: argv[i + 1] for i, word in enumerate(argv) if word == option}


def test_uml_in_its_sandbox_sees_the_control_directory_read_only_and_writes_only_its_own(tmp_path: Path) -> None:
    spec = JobSpec(argv=("true",), jobdir=tmp_path / "job")
    p = _prepared(tmp_path)
    inst = UmlInstance(spec, p, FoundKernel(Path("/bin/true"), KernelSource.OPTION), TRAITS, "/usr/bin/bwrap")
    paths = _paths(tmp_path)
    argv = inst.command(paths, FDS, STREAMS)
    assert "/usr/bin/bwrap" in argv and not inst.needs_death_signal  # bubblewrap's --die-with-parent does it
    writable, read_only = _pairs(argv, "--bind"), _pairs(argv, "--ro-bind")
    assert read_only[SANDBOX_CTL] == str(paths.ctl)
    assert writable[SANDBOX_OUT] == str(paths.out) and writable[SANDBOX_COW] == str(paths.disk)
    assert writable["/apppot/job"] == str(p.jobdir)
    assert set(writable) == {SANDBOX_OUT, SANDBOX_COW, "/apppot/job", "/apppot/uml"}
    assert read_only[cow.uml_base_path(p.image, p.fs_uuid)] == str(p.image.resolve())
    kernel_args = argv[argv.index("--") + 1 :]
    assert kernel_args[:3] == ["/apppot/linux", f"ubd0={SANDBOX_COW},{cow.uml_base_path(p.image, p.fs_uuid)}", "root=/dev/ubda"]
    assert "ssl0=null,fd:8" in kernel_args and "con0=null,fd:7" in kernel_args and "seccomp=on" in kernel_args
    assert inst.stdio(FDS) == (subprocess.DEVNULL, 7)


def test_a_checked_image_is_bound_by_the_descriptor_it_was_checked_through(tmp_path: Path) -> None:
    """Not by its name: a file put in its place after the check is not what UML boots."""
    p = _prepared(tmp_path)
    fd = os.open(p.image, os.O_RDONLY)
    try:
        p = p._replace(image_fd=fd)
        spec = JobSpec(argv=("true",), jobdir=tmp_path / "job")
        inst = UmlInstance(spec, p, FoundKernel(Path("/bin/true"), KernelSource.OPTION), TRAITS, "/usr/bin/bwrap")
        argv = inst.command(_paths(tmp_path), FDS, STREAMS)
        assert _pairs(argv, "--ro-bind-fd") == {cow.uml_base_path(p.image, p.fs_uuid): str(fd)}
        assert str(p.image.resolve()) not in _pairs(argv, "--ro-bind").values() and inst.inherited_fds() == [fd]
        inst.check_image_unchanged()
        p.image.rename(tmp_path / "moved.ext4")
        p.image.write_bytes(b"\0" * 4096)  # another file under the checked name (publish --force)
        inst.check_image_unchanged()  # not refused: the descriptor is what boots, whatever the name gives now
        unsandboxed = UmlInstance(spec, p, FoundKernel(Path("/bin/true"), KernelSource.OPTION), TRAITS, None)
        assert unsandboxed.inherited_fds() == []  # UML opens the image by its name: only the check guards it
        with pytest.raises(ImageError, match="was replaced or changed after its content id was checked"):
            unsandboxed.check_image_unchanged()
    finally:
        os.close(fd)


def test_an_older_bubblewrap_binds_the_checked_image_by_its_name(tmp_path: Path) -> None:
    """bubblewrap before 0.8.0 has no --ro-bind-fd: the image is bound by name, the runner's check guards it."""
    old_bwrap = tmp_path / "bwrap"
    old_bwrap.write_text("#!/bin/sh\necho '    --ro-bind SRC DEST           Bind mount the host path SRC readonly on DEST'\n")
    old_bwrap.chmod(0o755)
    p = _prepared(tmp_path)
    fd = os.open(p.image, os.O_RDONLY)
    try:
        spec = JobSpec(argv=("true",), jobdir=tmp_path / "job")
        kernel = FoundKernel(Path("/bin/true"), KernelSource.OPTION)
        inst = UmlInstance(spec, p._replace(image_fd=fd), kernel, TRAITS, str(old_bwrap))
        argv = inst.command(_paths(tmp_path), FDS, STREAMS)
        assert "--ro-bind-fd" not in argv and inst.inherited_fds() == []
        assert _pairs(argv, "--ro-bind")[cow.uml_base_path(p.image, p.fs_uuid)] == str(p.image.resolve())
    finally:
        os.close(fd)


def test_uml_without_a_sandbox_gets_host_paths_and_dies_with_apppot(tmp_path: Path) -> None:
    spec = JobSpec(argv=("true",), jobdir=tmp_path / "job", writable_image=True)
    p = _prepared(tmp_path)
    inst = UmlInstance(spec, p, FoundKernel(Path("/bin/true"), KernelSource.OPTION), TRAITS, None)
    paths = _paths(tmp_path)
    argv = inst.command(paths, FDS, STREAMS)
    assert argv[0] == "/bin/true" and f"ubd0={paths.disk}" in argv  # the image itself, no base
    assert f"apppot_ctl={paths.ctl}" in argv and f"apppot_job={p.jobdir}" in argv
    assert inst.needs_death_signal
    assert inst.disk(_rundir(tmp_path)).path == p.image.resolve()


def test_a_uml_guest_writes_a_new_private_cow(tmp_path: Path) -> None:
    spec = JobSpec(argv=("true",), jobdir=tmp_path / "job")
    p = _prepared(tmp_path)
    inst = UmlInstance(spec, p, FoundKernel(Path("/bin/true"), KernelSource.OPTION), TRAITS, None)
    disk = inst.disk(_rundir(tmp_path))
    assert disk.path == (tmp_path / "run" / "job.cow").resolve() and disk.path.stat().st_mode & 0o777 == 0o600
    assert disk.lock_fd is None  # a throw-away COW is this job's alone


def test_qemu_has_the_terminal_as_its_own_stdio_and_its_network_namespace(tmp_path: Path) -> None:
    spec = JobSpec(argv=("true",), jobdir=tmp_path / "job", backend="qemu")
    p = _prepared(tmp_path)
    inst = QemuInstance(spec, p, "/usr/bin/qemu-system-x86_64", Path("/k"), Path("/i"), Accel.TCG, "/usr/bin/bwrap")
    argv = inst.command(_paths(tmp_path), FDS, STREAMS)
    assert argv[:2] == ["/usr/bin/bwrap", "--unshare-net"] and inst.needs_death_signal
    assert any(word.startswith(f"file={p.image.resolve()},format=raw,if=virtio,snapshot=on") for word in argv)
    assert inst.stdio(FDS) == (subprocess.DEVNULL, 7)
    assert inst.stdio(FDS._replace(terminal=(10, 11))) == (10, 11)
    assert inst.disk(_rundir(tmp_path)).path == p.image.resolve()  # the snapshot keeps the writes
    assert inst.network().interface is None


def test_a_kept_cow_is_locked_for_one_job_at_a_time(tmp_path: Path) -> None:
    from apppot.errors import CowError

    kept = tmp_path / "kept.cow"
    spec = JobSpec(argv=("true",), jobdir=tmp_path / "job", cow=kept)
    p = _prepared(tmp_path)
    first = UmlInstance(spec, p, FoundKernel(Path("/bin/true"), KernelSource.OPTION), TRAITS, None)
    disk = first.disk(_rundir(tmp_path))
    assert disk.path == kept.resolve() and disk.lock_fd is not None
    try:
        with pytest.raises(CowError, match="in use by another running job"):
            first.disk(_rundir(tmp_path))
    finally:
        os.close(disk.lock_fd)
    os.close(first.disk(_rundir(tmp_path)).lock_fd or -1)  # free again once the first job let go

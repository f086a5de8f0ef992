"""apppot-snap carries what a user changed, all of it and only it: the agent's per-boot set-up and
shell histories are no change, excluded paths are never deleted, xattrs and holes survive."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apppot import snap
from apppot.snap import SnapError, sparse

AGENT_PASSWD = "user:x:1001:1001:AppPot user:/home/user:/bin/sh\n"
AGENT_GROUP = "user:x:1001:\n"
AGENT_SHADOW = "user:*:1:0:99999:7:::\n"


def make_system(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/motd").write_text("hello\n")
    (root / "home/user").mkdir(parents=True)
    (root / "root").mkdir()
    (root / "opt").mkdir()


def agent_boot(root: Path, uid: int = 1001) -> None:
    """What the agent does to the system at every boot of a non-root job (apppot_setup_user)."""
    for name, line in (("passwd", AGENT_PASSWD), ("group", AGENT_GROUP), ("shadow", AGENT_SHADOW)):
        line = line.replace("1001", str(uid))
        path = root / "etc" / name
        kept = [x for x in path.read_text().splitlines(keepends=True) if not x.startswith("user:")]
        path.write_text("".join(kept) + line)
        record = root / "var/lib/apppot/agent" / name
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(line)
    os.chown(root / "home/user", uid, uid)
    os.utime(root / "etc/passwd", (1, 1))  # another boot, another time


def dry_run(root: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    assert snap.main(["--root", str(root), "changes", "-n"]) == 0
    return capsys.readouterr().out.splitlines()


def test_the_agents_set_up_and_shell_histories_are_no_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_system(tmp_path)
    assert snap.main(["--root", str(tmp_path), "base"]) == 0
    for boot in range(2):
        agent_boot(tmp_path, uid=1001 + boot)
        (tmp_path / "home/user/.bash_history").write_text("ls\n")
        (tmp_path / "root/.bash_history").write_text("apt-get install x\n")
        (tmp_path / "home/user/.python_history").write_text("1+1\n")
        (tmp_path / "opt/added.txt").write_text("mine\n")
        assert dry_run(tmp_path, capsys) == ["add /opt/added.txt"]


def test_a_users_own_account_is_carried_without_the_agents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    make_system(work)
    snap.main(["--root", str(work), "base"])
    other = tmp_path / "other"
    shutil.copytree(work, other, symlinks=True)
    agent_boot(work)
    with (work / "etc/passwd").open("a") as f:
        f.write("bob:x:1002:1002::/home/bob:/bin/sh\n")
    assert dry_run(work, capsys) == ["modify /etc/passwd"]
    archive = tmp_path / "c.tar.gz"
    assert snap.main(["--root", str(work), "changes", str(archive)]) == 0
    snap.merge(str(archive), str(other))
    assert (other / "etc/passwd").read_text() == "root:x:0:0:root:/root:/bin/bash\nbob:x:1002:1002::/home/bob:/bin/sh\n"


def test_a_base_recorded_again_after_another_boot_has_the_same_id(tmp_path: Path) -> None:
    make_system(tmp_path)
    snap.main(["--root", str(tmp_path), "base"])
    pristine = (tmp_path / "var/lib/apppot/base.id").read_text()
    ids = []
    for uid in (1001, 1001, 2000):
        agent_boot(tmp_path, uid)
        snap.main(["--root", str(tmp_path), "base"])
        ids.append((tmp_path / "var/lib/apppot/base.id").read_text())
    assert ids == [pristine] * 3


def test_a_path_excluded_after_the_base_is_never_deleted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_system(tmp_path)
    (tmp_path / "opt/data").mkdir()
    (tmp_path / "opt/data/precious").write_text("keep me\n")
    snap.main(["--root", str(tmp_path), "base"])
    with (tmp_path / "etc/apppot/snap.exclude").open("a") as f:
        f.write("/opt/data\n")
    assert dry_run(tmp_path, capsys) == ["modify /etc/apppot/snap.exclude"]
    archive = tmp_path / "c.tar.gz"
    snap.main(["--root", str(tmp_path), "changes", str(archive)])
    assert snap.check_archive(str(archive))[0].deleted == []


def test_recording_a_base_again_warns_naming_the_old_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_system(tmp_path)
    assert snap.main(["--root", str(tmp_path), "base"]) == 0
    first = capsys.readouterr()
    assert "WARNING" not in first.err and str(tmp_path / "var/lib/apppot/base.manifest.gz") in first.out
    assert snap.main(["--root", str(tmp_path), "base"]) == 0
    again = capsys.readouterr()
    (line,) = again.err.splitlines()
    assert line.startswith("apppot-snap: WARNING: replacing the base state") and "base.manifest.gz" in line


def test_xattrs_are_recorded_compared_carried_and_restored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work, other = tmp_path / "work", tmp_path / "other"
    make_system(work)
    (work / "opt/tool").write_bytes(b"\x7fELF")
    snap.main(["--root", str(work), "base"])
    shutil.copytree(work, other, symlinks=True)
    os.setxattr(work / "opt/tool", "user.origin", b"\x00\xffbinary")
    # File capabilities: CAP_NET_RAW permitted and effective (a v2 security.capability).
    cap = bytes.fromhex("01000002" + "00200000" + "00000000" + "00000000" + "00000000")
    os.setxattr(work / "opt/tool", "security.capability", cap)
    assert dry_run(work, capsys) == ["attributes /opt/tool"]
    archive = tmp_path / "c.tar.gz"
    snap.main(["--root", str(work), "changes", str(archive)])
    snap.merge(str(archive), str(other))
    assert os.getxattr(other / "opt/tool", "user.origin") == b"\x00\xffbinary"
    assert os.getxattr(other / "opt/tool", "security.capability") == cap
    # And through the host's repack, which writes what the guest's tar extracts.
    repacked = tmp_path / "repacked.tar"
    snap.repack(str(archive), str(repacked))
    with tarfile.open(repacked) as tar:
        (m,) = tar.getmembers()
        assert m.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == cap
    agent_extract(repacked, tmp_path / "guest")
    assert os.getxattr(tmp_path / "guest/opt/tool", "security.capability") == cap
    assert os.getxattr(tmp_path / "guest/opt/tool", "user.origin") == b"\x00\xffbinary"


GIB = 1 << 30
# How apppot-init extracts the host's repacked archive (GNU tar, as in the Debian images).
AGENT_TAR = ("tar", "--numeric-owner", "--xattrs", "--xattrs-include=user.*", "--xattrs-include=security.capability", "-xpf")


def agent_extract(repacked: Path, root: Path) -> None:
    root.mkdir()
    subprocess.run([*AGENT_TAR, str(repacked), "-C", str(root)], check=True)


def test_a_sparse_file_stays_sparse(tmp_path: Path) -> None:
    work, other = tmp_path / "work", tmp_path / "other"
    make_system(work)
    snap.main(["--root", str(work), "base"])
    shutil.copytree(work, other, symlinks=True)
    with open(work / "opt/disk.img", "wb") as f:
        f.truncate(GIB)
        f.seek(GIB // 2)
        f.write(b"data" * 1024)
        f.seek(GIB - 3)
        f.write(b"end")
    archive = tmp_path / "c.tar.gz"
    snap.main(["--root", str(work), "changes", str(archive)])
    assert archive.stat().st_size < 64 << 10
    snap.merge(str(archive), str(other))
    merged = other / "opt/disk.img"
    assert merged.stat().st_size == GIB and merged.stat().st_blocks * 512 < 1 << 20
    with open(merged, "rb") as f:
        f.seek(GIB // 2)
        assert f.read(4096) == b"data" * 1024
        f.seek(GIB - 3)
        assert f.read() == b"end"
    repacked = tmp_path / "repacked.tar"
    snap.repack(str(archive), str(repacked))
    assert repacked.stat().st_size < 1 << 20
    agent_extract(repacked, tmp_path / "guest")
    extracted = tmp_path / "guest/opt/disk.img"
    assert extracted.stat().st_size == GIB and extracted.stat().st_blocks * 512 < 1 << 20
    with open(extracted, "rb") as f:
        f.seek(GIB // 2)
        assert f.read(4096) == b"data" * 1024


@st.composite
def segment_maps(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int]:
    gaps_and_lengths = draw(st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 20)), max_size=50))
    segments, pos = [], 0
    for gap, length in gaps_and_lengths:
        segments.append((pos + gap, length))
        pos += gap + length
    return segments, pos + draw(st.integers(0, 1 << 30))


@given(segment_maps())
def test_sparse_maps_read_back_as_written(case: tuple[list[tuple[int, int]], int]) -> None:
    segments, realsize = case
    encoded = io.BytesIO(sparse.encode_map(segments))
    stored = len(encoded.getvalue()) + sum(length for _, length in segments)
    read, blocks = sparse.read_map(lambda: encoded.read(512), stored, realsize, "member 'x'")
    assert (read, blocks * 512) == (segments, len(encoded.getvalue()))


@given(st.binary(max_size=2000))
def test_any_map_bytes_are_read_or_refused_in_one_line(data: bytes) -> None:
    padded = io.BytesIO(data + bytes(-len(data) % 512))
    try:
        sparse.read_map(lambda: padded.read(512), 4096, 1 << 20, "member 'x'")
    except SnapError as e:
        assert "\n" not in str(e) and str(e).startswith("member 'x' ")

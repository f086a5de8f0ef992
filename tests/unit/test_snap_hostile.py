"""Hostile changes archives: what the host checks is exactly what the guest's tar extracts, within a size
limit, from an intact gzip; every bad archive is one clear line and leaves nothing behind.

The repacked output is read back with Python's tarfile and with GNU tar (the Debian images' tar), and
extracted with the agent's own command line."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from apppot import snap
from apppot.snap import SnapError
from apppot.snap import archive as snap_archive

# How apppot-init extracts the host's repacked archive.
AGENT_TAR = ("--numeric-owner", "--xattrs", "--xattrs-include=user.*", "--xattrs-include=security.capability", "-xpf")

BASE = "b" * 64


def manifest_bytes(added: list[str], deleted: list[str] | None = None) -> bytes:
    doc = {"format": "apppot-changes", "base": BASE, "created": "", "tool": "", "deleted": deleted or [], "modified": []}
    return json.dumps({**doc, "added": added}).encode()


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]], claimed: list[str] | None = None) -> bytes:
    """A tar stream: the manifest (listing the members, or claimed), then the members with their data."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = manifest_bytes(claimed if claimed is not None else [m.name.rstrip("/") for m, _ in members])
        info = tarfile.TarInfo(snap.MANIFEST_MEMBER)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for m, content in members:
            tar.addfile(m, io.BytesIO(content) if m.isreg() else None)
    return out.getvalue()


def write_gz(path: Path, raw: bytes, level: int = 6) -> str:
    path.write_bytes(gzip.compress(raw, compresslevel=level, mtime=0))
    return str(path)


def regular(name: str, content: bytes = b"x", **pax: str) -> tuple[tarfile.TarInfo, bytes]:
    m = tarfile.TarInfo(name)
    m.size, m.mode, m.mtime = len(content), 0o644, 1_700_000_000
    m.pax_headers = dict(pax)
    return m, content


def symlink(name: str, target: str, **pax: str) -> tuple[tarfile.TarInfo, bytes]:
    m = tarfile.TarInfo(name)
    m.type, m.linkname, m.mode, m.mtime = tarfile.SYMTYPE, target, 0o777, 1_700_000_000
    m.pax_headers = dict(pax)
    return m, b""


def gnu_tar(*args: str | Path, cwd: Path | None = None) -> str:
    return subprocess.run(["tar", *map(str, args)], check=True, capture_output=True, text=True, cwd=cwd).stdout


def landed(root: Path) -> dict[str, str]:
    """What an extraction made: each path with its type and link target or content."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = path.read_text(errors="replace")
    return found


def repack_and_extract(source: str, tmp_path: Path) -> tuple[list[tarfile.TarInfo], list[str], dict[str, str]]:
    """Repack; then the output as Python reads it, as GNU tar lists it, and what the agent's tar makes of it."""
    target = tmp_path / "changes.tar"
    snap.repack(source, str(target))
    with tarfile.open(target) as t:
        members = t.getmembers()
    listed = gnu_tar("-tf", target).splitlines()
    root = tmp_path / "guest"
    root.mkdir()
    gnu_tar(*AGENT_TAR, target, "-C", root)
    return members, listed, landed(root)


# --- what the guest extracts is what the host checked ------------------------------------------


def test_a_gnu_sparse_name_pointing_at_a_reserved_path_is_refused(tmp_path: Path) -> None:
    # Python takes the last of path and GNU.sparse.name, GNU tar always the latter: base.id would be replaced.
    source = write_gz(
        tmp_path / "a.tar.gz",
        tar_bytes([regular("opt/x", b"abc", **{"GNU.sparse.name": "var/lib/apppot/base.id", "path": "opt/x"})]),
    )
    with pytest.raises(SnapError, match=r"member 'opt/x' has sparse records without a PAX 1.0 map: refused"):
        snap.repack(source, str(tmp_path / "out.tar"))
    assert not (tmp_path / "out.tar").exists()


def test_pax_overrides_are_applied_once_and_never_copied(tmp_path: Path) -> None:
    """pax keywords change what Python read; the output has only fresh headers with those values."""
    long_name = "opt/" + "d" * 120 + "/file"
    members = [
        regular("opt/x", b"over", path="opt/y"),  # the ustar name says opt/x, pax path says opt/y: opt/y it is
        regular("opt/owned", b"o", uname="root", gname="root", uid="1234", comment="hello"),
        regular("opt/xattr", b"a", **{"mtime": "1700000000.5"}),
        symlink("opt/l", "/ignored", linkpath="/etc/motd"),
        regular(long_name, b"long"),
        regular("opt/\u00e9t\u00e9", b"utf8"),
    ]
    source = write_gz(
        tmp_path / "a.tar.gz", tar_bytes(members, ["opt/y", "opt/owned", "opt/xattr", "opt/l", long_name, "opt/\u00e9t\u00e9"])
    )
    out, listed, made = repack_and_extract(source, tmp_path)
    expected = ["opt/y", "opt/owned", "opt/xattr", "opt/l", long_name, "opt/\u00e9t\u00e9"]
    assert [m.name for m in out] == expected
    assert listed == expected
    assert made == {
        "opt": "dir",
        "opt/y": "over",
        "opt/owned": "o",
        "opt/xattr": "a",
        "opt/l": "-> /etc/motd",
        "opt/" + "d" * 120: "dir",
        long_name: "long",
        "opt/\u00e9t\u00e9": "utf8",
    }
    owned = next(m for m in out if m.name == "opt/owned")
    assert (owned.uid, owned.uname, owned.gname) == (1234, "", "")
    assert next(m for m in out if m.name == "opt/xattr").mtime == 1_700_000_000
    # Only the pax records tarfile itself needs for the long and non-ASCII names.
    assert {k for m in out for k in m.pax_headers} == {"path"}
    raw = (tmp_path / "changes.tar").read_bytes()
    for word in (b"GNU.sparse", b"SCHILY", b"uname", b"comment", b"hello", b"/ignored", b"opt/x\0"):
        assert word not in raw


@pytest.mark.parametrize("sparse_format", ["--format=gnu", *(f"--format=pax --sparse-version={v}" for v in ("0.0", "0.1"))])
def test_sparse_members_of_old_formats_are_refused(tmp_path: Path, sparse_format: str) -> None:
    tree = tmp_path / "tree"
    (tree / "opt").mkdir(parents=True)
    (tree / snap.MANIFEST_MEMBER).write_bytes(manifest_bytes(["opt/hole"]))
    with open(tree / "opt/hole", "wb") as f:  # 64 MiB, nearly all hole: a few hundred bytes packed
        f.seek(64 << 20)
        f.write(b"end")
    source = tmp_path / "sparse.tar.gz"
    gnu_tar("--sparse", *sparse_format.split(), "-czf", source, snap.MANIFEST_MEMBER, "opt/hole", cwd=tree)
    assert source.stat().st_size < 64 << 10
    with pytest.raises(SnapError, match=r"member 'opt/hole' is .*sparse file of an old format"):
        snap.check_archive(str(source))
    assert not (tmp_path / "out.tar").exists()


def test_gnu_tars_pax_sparse_members_stay_sparse_through_repack_and_the_agents_tar(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "opt").mkdir(parents=True)
    (tree / snap.MANIFEST_MEMBER).write_bytes(manifest_bytes(["opt/hole"]))
    with open(tree / "opt/hole", "wb") as f:
        f.seek(64 << 20)
        f.write(b"end")
    source = tmp_path / "sparse.tar.gz"
    gnu_tar("--sparse", "--format=pax", "--sparse-version=1.0", "-czf", source, snap.MANIFEST_MEMBER, "opt/hole", cwd=tree)
    snap.repack(str(source), str(tmp_path / "changes.tar"))
    assert (tmp_path / "changes.tar").stat().st_size < 64 << 10
    (tmp_path / "guest").mkdir()
    gnu_tar(*AGENT_TAR, tmp_path / "changes.tar", "-C", tmp_path / "guest")
    hole = tmp_path / "guest/opt/hole"
    assert hole.stat().st_size == (64 << 20) + 3 and hole.stat().st_blocks * 512 < 1 << 20
    assert hole.read_bytes()[-3:] == b"end"


@pytest.mark.parametrize(
    ("sparse_map", "message"),
    [
        (b"99999999\n", "more than 65536 sparse segments"),
        (b"2\n0\n512\n100\n512\n", "overlapping or out-of-file segments"),
        (b"1\n0\n5000\n", "overlapping or out-of-file segments"),
        (b"1\n0\n-1\n", "is not a number"),
        (b"1\n0\n" + b"9" * 40 + b"\n", "is not a number"),
        (b"1\n0\n512\n", "does not match its data"),
        (b"1\n" + b"1" * 600, "ends inside its sparse map"),
    ],
)
def test_malformed_sparse_maps_are_refused(tmp_path: Path, sparse_map: bytes, message: str) -> None:
    data = sparse_map + bytes(-len(sparse_map) % 512) + b"x" * 100
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "opt/s", "GNU.sparse.realsize": "4096"}
    source = write_gz(tmp_path / "a.tar.gz", tar_bytes([regular("opt/GNUSparseFile.0/s", data, **pax)], ["opt/s"]))
    with pytest.raises(SnapError, match=f"member 'opt/s' .*{message}"):
        snap.repack(source, str(tmp_path / "out.tar"))
    assert not (tmp_path / "out.tar").exists()


def test_a_sparse_file_larger_than_the_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(snap.MAX_SIZE_ENV, "1M")
    data = b"1\n0\n1\n" + bytes(512 - 6) + b"x"
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "opt/s", "GNU.sparse.realsize": str(1 << 40)}
    source = write_gz(tmp_path / "a.tar.gz", tar_bytes([regular("opt/s", data, **pax)]))
    with pytest.raises(SnapError, match="expands to more than 1048576 bytes"):
        snap.check_archive(source)


@pytest.mark.parametrize(
    ("xattr", "value", "message"),
    [
        ("trusted.overlay.opaque", "y", "restores only user.* and security.capability"),
        ("security.selinux", "system_u:object_r:shadow_t:s0", "restores only user.* and security.capability"),
        ("system.posix_acl_access", "x", "restores only user.* and security.capability"),
        ("security.capability", "x", "malformed security.capability"),
        ("user.big", "x" * (65 << 10), "more than 65536 bytes"),
    ],
)
def test_xattrs_apppot_never_restores_are_refused(tmp_path: Path, xattr: str, value: str, message: str) -> None:
    source = write_gz(tmp_path / "a.tar.gz", tar_bytes([regular("opt/x", b"a", **{f"SCHILY.xattr.{xattr}": value})]))
    with pytest.raises(SnapError, match=f"member 'opt/x' has .*{message}"):
        snap.repack(source, str(tmp_path / "out.tar"))
    assert not (tmp_path / "out.tar").exists()


# --- size limits --------------------------------------------------------------------------------


def test_a_zero_bomb_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(snap.MAX_SIZE_ENV, "1M")
    source = write_gz(tmp_path / "bomb.tar.gz", tar_bytes([regular("opt/zeros", bytes(8 << 20))]), level=9)
    assert os.path.getsize(source) < 64 << 10
    with pytest.raises(SnapError, match=rf"bomb\.tar\.gz expands to more than 1048576 bytes .*{snap.MAX_SIZE_ENV}"):
        snap.repack(source, str(tmp_path / "out.tar"))
    assert not (tmp_path / "out.tar").exists()


def test_zeros_after_the_end_of_the_archive_count_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(snap.MAX_SIZE_ENV, "1M")
    source = write_gz(tmp_path / "padded.tar.gz", tar_bytes([regular("opt/a")]) + bytes(8 << 20), level=9)
    with pytest.raises(SnapError, match=r"expands to more than 1048576 bytes"):
        snap.check_archive(source)


def test_the_default_limit_and_a_bad_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(snap.MAX_SIZE_ENV, raising=False)
    assert snap.max_size() == snap.DEFAULT_MAX_SIZE == 4 << 30
    monkeypatch.setenv(snap.MAX_SIZE_ENV, "2G")
    assert snap.max_size() == 2 << 30
    monkeypatch.setenv(snap.MAX_SIZE_ENV, "lots")
    with pytest.raises(SnapError, match=rf"{snap.MAX_SIZE_ENV}='lots' is not a size"):
        snap.check_archive(write_gz(tmp_path / "a.tar.gz", tar_bytes([regular("opt/a")])))


def test_an_archive_larger_than_the_free_space_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header claiming a petabyte: refused for the free space, before any of its data is read."""
    monkeypatch.setenv(snap.MAX_SIZE_ENV, str(1 << 60))
    huge = tarfile.TarInfo("opt/huge")
    huge.size = 1 << 50
    # The manifest's header and data (one block each), then the huge member's header; its data never comes.
    raw = tar_bytes([], ["opt/huge"])[:1024] + huge.tobuf(tarfile.PAX_FORMAT) + bytes(4096)
    source = write_gz(tmp_path / "huge.tar.gz", raw)
    target = tmp_path / "out.tar"
    with pytest.raises(
        SnapError, match=rf"huge\.tar\.gz expands to at least \d+ bytes \(.*\), more than the \d+ bytes free in {tmp_path}"
    ):
        snap.repack(source, str(target))
    assert not target.exists()


def test_a_huge_pax_header_is_refused(tmp_path: Path) -> None:
    source = write_gz(tmp_path / "a.tar.gz", tar_bytes([regular("opt/a", comment="c" * (2 << 20))]), level=9)
    with pytest.raises(SnapError, match=r"a header of more than 1048576 bytes"):
        snap.check_archive(source)


def test_too_many_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snap_archive, "MAX_MEMBERS", 3)
    source = write_gz(tmp_path / "a.tar.gz", tar_bytes([regular(f"opt/{i}") for i in range(4)]))
    with pytest.raises(SnapError, match=r"more than 3 members"):
        snap.check_archive(source)


def sparse_member(name: str, segments: int) -> tuple[tarfile.TarInfo, bytes]:
    """A PAX 1.0 sparse member whose map has this many empty segments (a few bytes each, gzip takes them to nothing)."""
    sparse_map = f"{segments}\n".encode() + b"0\n0\n" * segments
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name, "GNU.sparse.realsize": "0"}
    return regular(f"opt/GNUSparseFile.0/{name.rsplit('/', 1)[-1]}", sparse_map + bytes(-len(sparse_map) % 512), **pax)


def test_sparse_maps_are_bounded_for_the_whole_archive(tmp_path: Path) -> None:
    # Each map is within its bound, but the host would hold all of them (70 bytes a segment) while it reads:
    # 16 000 such members (a 7 MB gzip, within the 4 GiB limit) would take 75 GB of the host's memory.
    members = [sparse_member(f"opt/s{i}", 1 << 16) for i in range(20)]
    source = write_gz(tmp_path / "a.tar.gz", tar_bytes(members, [f"opt/s{i}" for i in range(20)]), level=9)
    assert os.path.getsize(source) < 64 << 10
    with pytest.raises(SnapError, match=r"member 'opt/s\d+' .*more than 1048576 sparse segments in all: refused"):
        snap.check_archive(source)
    _, members_read = snap.check_archive(write_gz(tmp_path / "b.tar.gz", tar_bytes([members[0]], ["opt/s0"])))
    assert len(members_read[0].sparse or []) == 1 << 16


def test_xattrs_are_bounded_for_the_whole_archive(tmp_path: Path) -> None:
    value = "v" * (60 << 10)
    xattrs = {f"SCHILY.xattr.user.x{k}": value for k in range(15)}  # 900 KiB a member, within a header
    source = write_gz(tmp_path / "a.tar.gz", tar_bytes([regular(f"opt/{i}", b"x", **xattrs) for i in range(20)]), level=9)
    with pytest.raises(SnapError, match=r"member 'opt/\d+' .*more than 16777216 bytes of xattrs in all: refused"):
        snap.check_archive(source)


def test_reading_holds_no_more_than_the_checked_fields_of_each_member(tmp_path: Path) -> None:
    """pax records the host never uses (a comment, here) are not kept while the archive is read: the
    memory a read takes does not grow with the archive's headers."""
    members = [regular(f"opt/{i}", comment="c" * (900 << 10)) for i in range(60)]  # 54 MB of headers
    source = write_gz(tmp_path / "a.tar.gz", tar_bytes(members), level=9)
    tracemalloc.start()
    try:
        snap.check_archive(source)
        snap.repack(source, str(tmp_path / "out.tar"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_a_path_longer_than_path_max_is_refused(tmp_path: Path) -> None:
    long_name = "opt/" + "/".join(["d" * 200] * 25)
    with pytest.raises(SnapError, match=r"has a name or link target longer than 4096 bytes: refused"):
        snap.check_archive(write_gz(tmp_path / "a.tar.gz", tar_bytes([regular(long_name)])))
    with pytest.raises(SnapError, match=r"member 'opt/l'... has a name or link target longer than 4096 bytes: refused"):
        snap.check_archive(write_gz(tmp_path / "b.tar.gz", tar_bytes([symlink("opt/l", "/" + long_name)])))


# --- damaged archives ---------------------------------------------------------------------------


def good_archive(tmp_path: Path) -> bytes:
    """Random data (deflate stores it) and text (deflate codes it), so damage hits both kinds of block."""
    words = random.Random(1).choices(["apppot", "snap", "merge", "guest", "host", "tar"], k=8000)
    members = [regular(f"opt/{i}", os.urandom(20_000) if i % 2 else " ".join(words).encode()) for i in range(10)]
    return Path(write_gz(tmp_path / "good.tar.gz", tar_bytes(members))).read_bytes()


def damaged(tmp_path: Path, how: str) -> str:
    data = bytearray(good_archive(tmp_path))
    if how in ("middle", "early"):
        at = len(data) // 2 if how == "middle" else 2000
        data[at : at + 16] = b"\xff" * 16
    elif how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "no-trailer":
        data = data[:-8]
    elif how == "crc":
        data[-8] ^= 0xFF
    elif how == "length":
        data[-1] ^= 0xFF
    elif how == "trailing-garbage":
        data += b"garbage"
    path = tmp_path / f"{how}.tar.gz"
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize("how", ["middle", "early", "truncated", "no-trailer", "crc", "length", "trailing-garbage"])
def test_a_damaged_gzip_is_one_line_and_leaves_nothing(tmp_path: Path, how: str) -> None:
    source = damaged(tmp_path, how)
    with pytest.raises(SnapError) as e:
        snap.check_archive(source)
    assert str(e.value).startswith(f"{source} is damaged") and "\n" not in str(e.value)
    with pytest.raises(SnapError, match="is damaged"):
        snap.repack(source, str(tmp_path / "out.tar"))
    assert not (tmp_path / "out.tar").exists()


def test_the_good_archive_those_are_made_from_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "good.tar.gz").write_bytes(good_archive(tmp_path))
    _, members = snap.check_archive(str(tmp_path / "good.tar.gz"))
    assert len(members) == 10


def test_apppot_changes_show_of_a_damaged_archive_is_one_line(tmp_path: Path) -> None:
    source = damaged(tmp_path, "middle")
    code = "import sys; from apppot.cli import entry; sys.exit(entry())"
    r = subprocess.run([sys.executable, "-c", code, "changes", "show", source], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "is damaged" in r.stderr and "Traceback" not in r.stderr


# --- names, links, nesting ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([regular("opt/a\nb")], r"member 'opt/a\\nb' has a newline or other control character"),
        ([regular("opt/a\rb")], r"control character"),
        ([regular("opt/\x1b[2Jx")], r"control character"),
        (
            [symlink("opt/l", "/etc/motd\n/etc/shadow")],
            r"member 'opt/l' is a link whose target has a newline or other control character",
        ),
        ([symlink("opt/l", "x", linkpath="x\x00y")], r"control character"),  # a NUL comes only in pax
    ],
)
def test_control_characters_in_names_and_link_targets_are_refused(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], message: str
) -> None:
    with pytest.raises(SnapError, match=message):
        snap.check_archive(write_gz(tmp_path / "a.tar.gz", tar_bytes(members)))


def test_a_deletion_with_a_control_character_is_refused(tmp_path: Path) -> None:
    raw = tar_only_manifest(manifest_bytes([], ["/opt/x\r"]))
    with pytest.raises(SnapError, match=r"deletion '/opt/x\\r' is not a clean absolute path"):
        snap.check_archive(write_gz(tmp_path / "a.tar.gz", raw))


def tar_only_manifest(data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(snap.MANIFEST_MEMBER)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize(
    "nested", [b"[" * 200_000 + b"]" * 200_000, b'{"format": "apppot-changes", "deleted": ' + b"[" * 200_000]
)
def test_a_deeply_nested_manifest_is_refused_without_recursion(tmp_path: Path, nested: bytes) -> None:
    with pytest.raises(SnapError, match=r"\.apppot-changes\.json is malformed"):
        snap.check_archive(write_gz(tmp_path / "a.tar.gz", tar_only_manifest(nested)))


def test_a_deeply_nested_base_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "base.manifest.gz"
    path.write_bytes(gzip.compress(b'{"id": "x"}\n' + b"[" * 200_000 + b"\n"))
    with pytest.raises(SnapError, match="is damaged"):
        snap.read_manifest(str(path))


def test_an_owner_id_out_of_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SnapError, match=r"member 'opt/a' has an owner out of range"):
        snap.check_archive(write_gz(tmp_path / "a.tar.gz", tar_bytes([regular("opt/a", uid=str(1 << 40))])))


@pytest.mark.parametrize("mtime", ["nan", "inf", "1e30"])
def test_a_time_out_of_range_is_refused(tmp_path: Path, mtime: str) -> None:
    with pytest.raises(SnapError, match=r"member 'opt/a' has a time out of range"):
        snap.check_archive(write_gz(tmp_path / "a.tar.gz", tar_bytes([regular("opt/a", mtime=mtime)])))


def test_a_fifo_instead_of_an_archive_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.tar.gz")
    with pytest.raises(SnapError, match="is not a file"):
        snap.check_archive(str(tmp_path / "fifo.tar.gz"))


def test_a_plain_changes_archive_repacks_to_what_snap_merge_gives(tmp_path: Path) -> None:
    """An ordinary archive: GNU tar extracting the repacked copy gives what Python's own merge gives."""
    members = [regular("opt/a", b"A"), symlink("opt/l", "a"), regular("usr/local/bin/tool", b"#!/bin/sh\n")]
    (members[2][0]).mode = 0o4755
    source = write_gz(tmp_path / "a.tar.gz", tar_bytes(members))
    _, listed, made = repack_and_extract(source, tmp_path)
    assert listed == ["opt/a", "opt/l", "usr/local/bin/tool"]
    merged = tmp_path / "merged"
    (merged / "var/lib/apppot").mkdir(parents=True)
    (merged / "var/lib/apppot/base.id").write_text(BASE + "\n")
    snap.merge(source, str(merged))
    made_by_merge = {k: v for k, v in landed(merged).items() if not k.startswith("var")}
    assert made == made_by_merge
    assert os.stat(tmp_path / "guest/usr/local/bin/tool").st_mode & 0o7777 == 0o4755


def test_mutated_headers_give_a_snap_error_or_a_copy_gnu_tar_reads_as_checked(tmp_path: Path) -> None:
    """Random changes to the header fields (checksums made right again): never a traceback, and whatever
    is accepted lists the same in GNU tar as in the check."""
    members = [regular("opt/a", b"hello"), symlink("opt/l", "a"), regular("opt/" + "d" * 120, b"abc")]
    raw = tar_bytes(members)[:5120]
    headers = [at for at in range(0, len(raw), 512) if raw[at + 257 : at + 262] == b"ustar"]
    rng = random.Random(11)
    accepted = 0
    for _ in range(300):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            at = rng.choice(headers) + rng.choice([rng.randrange(345), 512 + rng.randrange(200)])  # a field, a pax record
            data[at] = rng.choice([0, 0x30, 0x37, 0x80, 0xFF, *b"SxL1\n/.", rng.randrange(256)])
        for at in headers:
            data[at + 148 : at + 156] = b" " * 8
            data[at + 148 : at + 156] = b"%06o\0 " % sum(data[at : at + 512])
        (tmp_path / "fuzz.tar").write_bytes(bytes(data))
        target = tmp_path / "out.tar"
        target.unlink(missing_ok=True)
        try:
            _, checked = snap.check_archive(str(tmp_path / "fuzz.tar"))
            snap.repack(str(tmp_path / "fuzz.tar"), str(target))
        except SnapError as e:
            assert "\n" not in str(e)
            assert not target.exists()
            continue
        accepted += 1
        assert [line.rstrip("/") for line in gnu_tar("-tf", target).splitlines()] == [m.name for m in checked]
    assert 10 < accepted < 290  # both outcomes were exercised

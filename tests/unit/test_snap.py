"""apppot-snap's pure parts: manifests, differences, archives and their safety checks, merging into a directory."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from apppot import snap
from apppot.snap import DIR, FILE, LINK, Entry, SnapError


def e(path: str, kind: str = FILE, mode: int = 0o644, uid: int = 0, gid: int = 0, content: str = "aa", size: int = 1) -> Entry:
    return Entry(path, kind, mode, uid, gid, size if kind == FILE else 0, 100, content if kind in (FILE, LINK) else "")


def test_diff_added_modified_deleted_meta_type_and_link_changes() -> None:
    base = {
        p.path: p
        for p in [
            e("/etc"),
            e("/etc/motd", content="old"),
            e("/etc/keep"),
            e("/etc/mode", mode=0o644),
            e("/etc/owner", uid=0),
            e("/opt/dir", DIR),
            e("/opt/dir/a"),
            e("/opt/dir/b/c"),
            e("/opt/was-file"),
            e("/opt/was-dir", DIR),
            e("/opt/was-dir/x"),
            e("/usr/bin/link", LINK, content="/bin/a"),
        ]
    }
    now = {
        p.path: p
        for p in [
            e("/etc"),
            e("/etc/motd", content="new"),
            e("/etc/keep"),
            e("/etc/mode", mode=0o600),
            e("/etc/owner", uid=1000),
            e("/etc/new"),
            e("/opt/was-file", DIR),
            e("/opt/was-dir"),
            e("/usr/bin/link", LINK, content="/bin/b"),
        ]
    }
    c = snap.diff(base, now)
    assert [x.path for x in c.added] == ["/etc/new"]
    assert sorted(x.path for x in c.modified) == ["/etc/motd", "/opt/was-dir", "/opt/was-file", "/usr/bin/link"]
    assert sorted(x.path for x in c.meta) == ["/etc/mode", "/etc/owner"]
    # Only the top of a deleted tree; type changes and relinked links are removed before extraction.
    assert sorted(c.deleted) == ["/opt/dir", "/opt/was-dir", "/opt/was-file", "/usr/bin/link"]


def test_topmost_keeps_the_tops_deepest_first() -> None:
    assert snap.topmost(["/a/b/c", "/a/b", "/ab", "/x/y/z", "/a/b/d"]) == ["/x/y/z", "/a/b", "/ab"]


def test_excludes() -> None:
    excludes = snap.read_excludes("/nonexistent-root")
    assert snap.is_excluded("/proc/1", excludes) and snap.is_excluded("/home/user/job", excludes)
    assert snap.is_excluded("/var/log/syslog", excludes)
    assert not snap.is_excluded("/var/logs", excludes) and not snap.is_excluded("/etc", excludes)


def make_system(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/motd").write_text("hello\n")
    (root / "etc/mode").write_text("m\n")
    (root / "usr/share/doc/x").mkdir(parents=True)
    (root / "usr/share/doc/x/copyright").write_text("c\n")
    (root / "opt").mkdir()
    (root / "opt/file-then-dir").write_text("f\n")
    (root / "proc").mkdir()
    (root / "proc/ignored").write_text("not part of the system\n")


def test_base_changes_merge_round_trip(tmp_path: Path) -> None:
    """Changes made in one copy of a system, merged into another copy, give the same manifest."""
    work, other = tmp_path / "work", tmp_path / "other"
    make_system(work)
    assert snap.main(["--root", str(work), "base"]) == 0
    # A copy with the same mtimes: two systems made one after the other could straddle a second.
    shutil.copytree(work, other, symlinks=True)
    assert (work / "etc/apppot/snap.exclude").read_text() == snap.DEFAULT_EXCLUDES
    base_id = (work / "var/lib/apppot/base.id").read_text().strip()
    # The base records the whole system, so the two copies share it only if they were identical.
    assert base_id == (other / "var/lib/apppot/base.id").read_text().strip()

    (work / "etc/motd").write_text("changed\n")
    (work / "opt/new.txt").write_text("new\n")
    os.chmod(work / "etc/mode", 0o600)
    (work / "usr/share/doc/x/copyright").unlink()
    os.symlink("/opt/new.txt", work / "opt/link")
    os.symlink("../etc/motd", work / "opt/rel-link")
    (work / "opt/file-then-dir").unlink()
    (work / "opt/file-then-dir").mkdir()
    (work / "opt/file-then-dir/inside").write_text("i\n")
    archive = tmp_path / "changes.tar.gz"
    assert snap.main(["--root", str(work), "changes", str(archive)]) == 0

    info, members = snap.check_archive(str(archive))
    assert info.base == base_id
    assert "/usr/share/doc/x/copyright" in info.deleted and "/opt/file-then-dir" in info.deleted
    assert "/opt/new.txt" in info.added and "/etc/motd" in info.modified and "/etc/mode" in info.modified
    assert all(m.uname == "" for m in members)

    snap.merge(str(archive), str(other))
    excludes = snap.read_excludes(str(work))
    assert snap.scan(str(other), excludes) == snap.scan(str(work), excludes)
    assert os.readlink(other / "opt/link") == "/opt/new.txt"
    assert (os.stat(other / "etc/mode").st_mode & 0o777) == 0o600


def test_merge_onto_another_base_is_refused_unless_forced(tmp_path: Path) -> None:
    work, other = tmp_path / "work", tmp_path / "other"
    for root in (work, other):
        make_system(root)
    (other / "etc/extra").write_text("different base\n")
    for root in (work, other):
        snap.main(["--root", str(root), "base"])
    (work / "opt/new.txt").write_text("new\n")
    archive = tmp_path / "c.tar.gz"
    snap.main(["--root", str(work), "changes", str(archive)])
    with pytest.raises(SnapError, match=r"was made against base .*, this system is base .*pass --force"):
        snap.merge(str(archive), str(other))
    snap.merge(str(archive), str(other), force=True)
    assert (other / "opt/new.txt").read_text() == "new\n"


def test_dry_run_lists_and_an_existing_file_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "sys"
    make_system(root)
    snap.main(["--root", str(root), "base"])
    capsys.readouterr()
    (root / "etc/motd").write_text("changed\n")
    (root / "usr/share/doc/x/copyright").unlink()
    assert snap.main(["--root", str(root), "changes", "-n"]) == 0
    assert capsys.readouterr().out.splitlines() == ["modify /etc/motd", "delete /usr/share/doc/x/copyright"]
    target = tmp_path / "mine.tar.gz"
    target.write_text("precious")
    assert snap.main(["--root", str(root), "changes", str(target)]) == 1
    assert "exists; give another FILE or pass --overwrite" in capsys.readouterr().err
    assert target.read_text() == "precious"


def test_changes_without_a_base_says_how_to_record_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_system(tmp_path)
    assert snap.main(["--root", str(tmp_path), "changes", "-n"]) == 1
    assert "record one with 'apppot-snap base'" in capsys.readouterr().err


# --- hand-made archives -------------------------------------------------------------------------

MANIFEST: dict[str, object] = {
    "format": "apppot-changes",
    "base": "b" * 64,
    "created": "now",
    "tool": "t",
    "deleted": [],
    "added": [],
    "modified": [],
}


def archive(tmp_path: Path, members: list[tarfile.TarInfo], manifest: dict[str, object] | bytes | None = MANIFEST) -> str:
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        if isinstance(manifest, dict) and not manifest["added"]:  # a manifest that lists the members
            manifest = {**manifest, "added": [m.name.rstrip("/") for m in members]}
        if manifest is not None:
            data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
            info = tarfile.TarInfo(snap.MANIFEST_MEMBER)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for m in members:
            tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isreg() else None)
    return str(path)


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = linkname
    m.size = 1 if kind == tarfile.REGTYPE else 0
    return m


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([member("/etc/passwd")], r"member '/etc/passwd' has an absolute path"),
        ([member("etc/../../x")], r"member 'etc/../../x' has an absolute path, '\.\.'"),
        ([member("opt/evil", tarfile.SYMTYPE, "../../../etc")], r"member 'opt/evil' is a link pointing outside the system"),
        ([member("opt/hard", tarfile.LNKTYPE, "etc/shadow")], r"member 'opt/hard' is a hard link"),
        ([member("opt/sda", tarfile.BLKTYPE)], r"member 'opt/sda' is a device file"),
        ([member("opt/null", tarfile.CHRTYPE)], r"member 'opt/null' is a device file"),
        ([member("dev/x")], r"member 'dev/x' is in a part of the system apppot-snap never changes \(/dev\)"),
        ([member("home/user/job/.bashrc")], r"never changes \(/home/user/job\)"),
        ([member("run/apppot/status")], r"never changes \(/run\)"),
        ([member("home/user", tarfile.SYMTYPE, "/etc")], r"member 'home/user' is in a part .* \(/home/user/job\)"),
        ([member("opt/l", tarfile.SYMTYPE, "/etc"), member("opt/l/passwd")], r"member 'opt/l/passwd' lies under a link"),
        ([member("opt/a"), member("opt/a")], r"appears twice"),
        ([member("./opt/a")], r"'\.'"),
        ([member("opt//a")], r"'//'"),
        ([member(snap.MANIFEST_MEMBER)], r"appears twice"),
        ([member("a\nb")], r"newline"),
    ],
)
def test_malicious_archives_are_refused_naming_the_member(tmp_path: Path, members: list[tarfile.TarInfo], message: str) -> None:
    with pytest.raises(SnapError, match=message):
        snap.check_archive(archive(tmp_path, members))


def test_absolute_link_targets_stay_inside_the_system(tmp_path: Path) -> None:
    _, members = snap.check_archive(archive(tmp_path, [member("usr/bin/vi", tarfile.SYMTYPE, "/etc/alternatives/vi")]))
    assert [m.name for m in members] == ["usr/bin/vi"]


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (None, "has no .apppot-changes.json first"),
        (b"{not json", "is malformed"),
        ({**MANIFEST, "format": "other"}, "is malformed"),
        ({k: v for k, v in MANIFEST.items() if k != "base"}, "is malformed"),
        ({**MANIFEST, "deleted": "etc"}, "is malformed"),
        ({**MANIFEST, "deleted": ["etc/x"]}, r"deletion 'etc/x' is not a clean absolute path"),
        ({**MANIFEST, "deleted": ["/etc/../.."]}, r"deletion '/etc/\.\./\.\.' is not a clean"),
        ({**MANIFEST, "deleted": ["/"]}, r"deletion '/' is not a clean"),
        ({**MANIFEST, "deleted": ["/var/run/"]}, r"deletion '/var/run/' is not a clean"),
        ({**MANIFEST, "deleted": ["/home"]}, r"deletion '/home' is in or above a part"),
        ({**MANIFEST, "deleted": ["/home/user/job/data"]}, r"deletion '/home/user/job/data' is in or above"),
        ({**MANIFEST, "added": ["/etc/y"]}, r"its manifest does not list exactly its members"),
        ({**MANIFEST, "added": ["etc/x", "evil\x1b[2J"]}, r"members \(e\.g\. 'evil\\x1b\[2J'\)"),
        ({**MANIFEST, "created": "now\napppot: forged"}, r"'created' has a newline or other control character"),
        ({**MANIFEST, "tool": "t\x1b[2J"}, r"'tool' has a newline or other control character"),
        ({**MANIFEST, "tool": "t\x9b2J"}, r"'tool' has a newline or other control character"),
        ({**MANIFEST, "created": "\u202enow"}, r"'created' has a newline or other control character"),
        ({**MANIFEST, "base": "B" * 64}, r"'base' is not 64 lowercase hex digits"),
        ({**MANIFEST, "base": "b" * 63}, r"'base' is not 64"),
        ({**MANIFEST, "base": "b" * 64 + "\n"}, r"'base' is not 64"),
        ({**MANIFEST, "base": "g" * 64}, r"'base' is not 64"),
    ],
)
def test_missing_or_malformed_manifests_are_refused(
    tmp_path: Path, manifest: dict[str, object] | bytes | None, message: str
) -> None:
    with pytest.raises(SnapError, match=message):
        snap.check_archive(archive(tmp_path, [member("etc/x")], manifest))


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "x.tar.gz").write_text("plain text")
    with pytest.raises(SnapError, match=r"is not a readable tar\.gz archive"):
        snap.check_archive(str(tmp_path / "x.tar.gz"))
    with pytest.raises(SnapError, match="does not exist"):
        snap.check_archive(str(tmp_path / "missing.tar.gz"))


def test_a_time_only_change_is_packed_and_sockets_are_skipped(tmp_path: Path) -> None:
    import socket

    root = tmp_path / "sys"
    make_system(root)
    snap.main(["--root", str(root), "base"])
    os.utime(root / "etc/motd", (1000000000, 1000000000))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "opt/sock"))
        base = snap.read_manifest(str(root / "var/lib/apppot/base.manifest.gz"))
        changes = snap.diff(base.entries, snap.scan(str(root)))
    assert [e.path for e in changes.meta] == ["/etc/motd"] and not changes.added


def test_repack_keeps_exactly_the_checked_members(tmp_path: Path) -> None:
    source = archive(tmp_path, [member("opt/a"), member("opt/l", tarfile.SYMTYPE, "/etc/motd")])
    target = tmp_path / "clean.tar"
    snap.repack(source, str(target))
    with tarfile.open(target) as t:
        assert [(m.name, m.type) for m in t.getmembers()] == [("opt/a", tarfile.REGTYPE), ("opt/l", tarfile.SYMTYPE)]


def test_deletions_are_reduced_to_their_tops() -> None:
    assert snap.topmost(["/a", "/a b", "/a/x", "/a b/y"]) == ["/a", "/a b"]


def test_a_link_resolved_through_another_link_of_the_archive_is_refused(tmp_path: Path) -> None:
    members = [member("opt/l", tarfile.SYMTYPE, "."), member("opt/e", tarfile.SYMTYPE, "l/.."), member("opt/f")]
    with pytest.raises(SnapError, match="'opt/e' is a link resolved through another link"):
        snap.check_archive(archive(tmp_path, members))


def test_the_sha256_of_an_archive_is_of_the_bytes_read_and_checked(tmp_path: Path) -> None:
    import hashlib

    source = archive(tmp_path, [member("opt/a")])
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    assert snap.check_archive(source)[0].sha256 == digest
    assert snap.repack(source, str(tmp_path / "clean.tar")).sha256 == digest
    plain = tmp_path / "plain.tar"  # not gzipped: every byte is read all the same
    with tarfile.open(plain, "w") as tar, tarfile.open(source) as gz:
        for m in gz.getmembers():
            tar.addfile(m, gz.extractfile(m))
    assert snap.check_archive(str(plain))[0].sha256 == hashlib.sha256(plain.read_bytes()).hexdigest()


def test_an_archive_changed_between_the_two_readings_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same headers, other data: what the guest gets must be what the recorded sha256 is of."""
    import importlib

    merge = importlib.import_module("apppot.snap.merge")  # the module: the package's name 'merge' is its function
    source = archive(tmp_path, [member("opt/a")])
    other = tmp_path / "other"
    other.mkdir()
    with tarfile.open(source) as gz, tarfile.open(other / "a.tar.gz", "w:gz") as tar:
        for m in gz.getmembers():
            tar.addfile(m, io.BytesIO(b"y" * m.size) if m.name == "opt/a" else gz.extractfile(m))
    scan = merge._scan

    def scan_then_swap(*args: object, **kwargs: object) -> object:
        found = scan(*args, **kwargs)
        os.replace(other / "a.tar.gz", source)
        return found

    monkeypatch.setattr(merge, "_scan", scan_then_swap)
    with pytest.raises(SnapError, match="changed while it was read"):
        snap.repack(source, str(tmp_path / "clean.tar"))
    assert not (tmp_path / "clean.tar").exists()

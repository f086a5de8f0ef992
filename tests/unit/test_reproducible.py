"""What makes two Debian builds the same image: the build's one time, the filesystem ids and command
line, the settled tree, and the inodes debugfs is given."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apppot.errors import HostError
from apppot.images import reproducible
from apppot.images.lock import make_lock

EPOCH = 1783764997  # 2026-07-11 10:16:37 UTC
DAY = EPOCH // 86400


def test_the_builds_time_comes_from_the_environment_then_the_lock_then_the_mirror() -> None:
    lock = make_lock("bookworm", "amd64", 1700000000, [], [("a", "1", "amd64")])

    def release() -> int:
        return EPOCH

    def no_mirror() -> int:
        raise AssertionError("the mirror was asked")

    assert reproducible.choose_time("1600000000", lock, no_mirror) == (1600000000, "$SOURCE_DATE_EPOCH")
    assert reproducible.choose_time(None, lock, no_mirror) == (1700000000, "the lock")
    assert reproducible.choose_time(None, None, release) == (EPOCH, "the suite's Release file")
    with pytest.raises(HostError, match=r"SOURCE_DATE_EPOCH='last week' is not a number"):
        reproducible.choose_time("last week", None, release)


def test_the_release_files_date() -> None:
    inrelease = (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nOrigin: Debian\nSuite: oldstable\n"
        "Codename: bookworm\nDate: Sat, 11 Jul 2026 10:16:37 UTC\nValid-Until: never\n"
    )
    assert reproducible.parse_release_date(inrelease) == EPOCH
    assert reproducible.parse_release_date("Origin: Debian\n") is None
    assert reproducible.parse_release_date("Date: someday\n") is None


def test_a_mirror_without_the_suite_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "dists" / "bookworm").mkdir(parents=True)
    (tmp_path / "dists" / "bookworm" / "Release").write_text("Origin: Debian\nDate: Sat, 11 Jul 2026 10:16:37 UTC\n")
    assert reproducible.release_epoch(f"file://{tmp_path}/", "bookworm") == EPOCH
    with pytest.raises(HostError, match=r"cannot read the date of trixie's Release file from file://.*set SOURCE_DATE_EPOCH"):
        reproducible.release_epoch(f"file://{tmp_path}", "trixie")


def test_the_filesystem_ids_follow_the_recipe_id() -> None:
    fs_uuid, seed = reproducible.filesystem_ids("ab" * 32)
    assert (fs_uuid, seed) == reproducible.filesystem_ids("ab" * 32)
    assert fs_uuid != seed
    assert reproducible.filesystem_ids("cd" * 32)[0] != fs_uuid
    assert reproducible.mkfs_argv("debian-dev-with-a-long-name", "ab" * 32, Path("/t/root"), Path("/t/image"), 4 << 30) == [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "debian-dev-with-",
        "-U",
        fs_uuid,
        "-E",
        f"hash_seed={seed}",
        "-d",
        "/t/root",
        "/t/image",
        "4194304k",
    ]
    assert reproducible.fixed_clock(EPOCH) == {"E2FSPROGS_FAKE_TIME": str(EPOCH), "SOURCE_DATE_EPOCH": str(EPOCH), "LC_ALL": "C"}


def test_no_password_changed_after_the_builds_day() -> None:
    shadow = f"root:*:{DAY + 150}:0:99999:7:::\ndaemon:*:{DAY - 3}:0:99999:7:::\nnobody:*::0:99999:7:::\n"
    assert reproducible.clamp_shadow(shadow, EPOCH) == (
        f"root:*:{DAY}:0:99999:7:::\ndaemon:*:{DAY - 3}:0:99999:7:::\nnobody:*::0:99999:7:::\n"
    )


def _tree(root: Path) -> None:
    for directory in ("etc/ssh", "var/log/apt", "var/lib/dbus", "var/cache/ldconfig", "lib/systemd/system"):
        (root / directory).mkdir(parents=True)
    (root / "etc/ssh/sshd_config").write_text("Port 22\n")
    for kind in ("rsa", "ed25519"):
        (root / f"etc/ssh/ssh_host_{kind}_key").write_text("secret")
        (root / f"etc/ssh/ssh_host_{kind}_key.pub").write_text("public")
    (root / "lib/systemd/system/ssh.service").write_text("[Service]\n")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/cache/ldconfig/aux-cache").write_bytes(b"\0random")
    (root / "etc/resolv.conf").write_text("nameserver 192.168.1.1\nsearch the-build-host.example\n")
    (root / "var/log/apt/history.log").write_text("Start-Date: today\n")
    (root / "var/log/wtmp").write_bytes(b"")
    (root / "etc/shadow").write_text(f"root:*:{DAY + 1}:0:99999:7:::\n")


def test_the_tree_keeps_nothing_of_the_build_or_its_host(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    os.chmod(root / "var/log/apt/history.log", 0o640)
    reproducible.settle_tree(root, EPOCH)
    assert sorted(p.name for p in (root / "etc/ssh").iterdir()) == ["sshd_config"]
    unit = root / "etc/systemd/system" / reproducible.SSH_KEYS_UNIT
    assert "ExecStart=/usr/bin/ssh-keygen -A" in unit.read_text()
    assert os.readlink(root / "etc/systemd/system/ssh.service.requires" / reproducible.SSH_KEYS_UNIT) == f"../{unit.name}"
    assert (root / "etc/machine-id").read_text() == ""
    assert not (root / "var/lib/dbus/machine-id").exists()
    assert not (root / "var/cache/ldconfig/aux-cache").exists()
    assert (root / "etc/resolv.conf").read_text() == reproducible.RESOLV_CONF
    log = root / "var/log/apt/history.log"
    assert log.read_text() == "" and (log.stat().st_mode & 0o777) == 0o640  # emptied, kept
    assert (root / "etc/shadow").read_text() == f"root:*:{DAY}:0:99999:7:::\n"
    reproducible.settle_tree(root, EPOCH)  # twice is the same as once
    assert sorted(p.name for p in (root / "etc/ssh").iterdir()) == ["sshd_config"]


def test_without_ssh_keys_no_unit_is_added(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    reproducible.settle_tree(root, EPOCH)
    assert not (root / "etc/systemd").exists()


def test_no_time_in_the_tree_is_after_the_builds(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d/new").write_text("x")
    (root / "old").write_text("x")
    os.utime(root / "old", ns=(EPOCH * 10**9, (EPOCH - 1000) * 10**9 + 123))
    (root / "link").symlink_to("/nowhere")
    reproducible.clamp_times(root, EPOCH)
    for path in (root, root / "d", root / "d/new", root / "link"):
        st = os.lstat(path)
        assert (st.st_atime_ns, st.st_mtime_ns) == (EPOCH * 10**9, EPOCH * 10**9), path
    assert os.lstat(root / "old").st_mtime_ns == (EPOCH - 1000) * 10**9  # older: kept, in whole seconds
    reproducible.clamp_times(root, EPOCH, reset=True)
    assert os.lstat(root / "old").st_mtime_ns == EPOCH * 10**9


DUMPE2FS = """\
Inode count:              32
Inodes per group:         8
First inode:              11

Group 0: (Blocks 0-32767) csum 0xe66b
  Primary superblock at 0, Group descriptors at 1-1
  Free inodes:
Group 1: (Blocks 32768-65535) csum 0xbac1
  Free inodes: 12-14, 16
Group 2: (Blocks 65536-98303) csum 0x47cd [INODE_UNINIT]
  Free inodes: 17-24
Group 3: (Blocks 98304-131071) csum 0x5e95 [INODE_UNINIT]
  Free blocks: 98304-131071
  Free inodes: 25-31
"""


def test_the_inodes_in_use_from_dumpe2fs() -> None:
    assert reproducible.used_inodes(DUMPE2FS) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15, 32]
    with pytest.raises(ValueError, match="no groups"):
        reproducible.used_inodes("Inodes per group: 8\n")

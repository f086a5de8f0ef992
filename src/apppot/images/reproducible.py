"""What makes two builds of one recipe, against one mirror state, the same image byte for byte.

- One time for the whole build, SOURCE_DATE_EPOCH: from the environment if set, else from the
  recipe's lock, else the Date of the suite's Release file on the mirror (it changes only when the
  mirror's state does). mmdebstrap and the programs dpkg runs read it from the environment.
- The tree: no file newer than that time, no access time but it, and nothing that holds build-time
  randomness or the build host's state (SSH host keys, machine ids, logs, the host's resolv.conf,
  /etc/shadow's day of the last password change).
- The filesystem: UUID and directory hash seed derived from the recipe id, e2fsprogs' clock fixed
  (E2FSPROGS_FAKE_TIME, SOURCE_DATE_EPOCH from e2fsprogs 1.47.1), the C locale (`mkfs.ext4 -d` copies
  each directory in scandir/alphasort order, whatever order the host's filesystem lists it in), and
  every inode's change and access time set afterwards: e2fsprogs before 1.47.1 copies the staging
  tree's change times, which no program can set.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError
from apppot.images import ext4
from apppot.images.lock import Lock
from apppot.proc import run

SDE_ENV = "SOURCE_DATE_EPOCH"
RESOLV_CONF = "nameserver 10.0.2.3\n"  # what the agent writes when the job has a network (slirp's DNS)
SSH_KEYS_UNIT = "apppot-ssh-host-keys.service"
_SSH_KEYS_SERVICE = """\
[Unit]
Description=SSH host keys for this machine (AppPot images are built without any, so that builds are reproducible)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
RequiredBy=ssh.service
"""
_RELEASE_BYTES = 64 << 10  # the Date field is in the first lines of a Release file


class BuildTime(NamedTuple):
    epoch: int
    source: str  # where it came from, for the build's progress lines


def choose_time(env_value: str | None, lock: Lock | None, release: Callable[[], int]) -> BuildTime:
    """The build's one time: SOURCE_DATE_EPOCH from the environment, else the lock's, else the Release file's Date."""
    if env_value is not None:
        if not env_value.isdigit():
            raise HostError(f"{SDE_ENV}={env_value!r} is not a number of seconds since 1970; unset it or give one")
        return BuildTime(int(env_value), f"${SDE_ENV}")
    if lock is not None:
        return BuildTime(lock.source_date_epoch, "the lock")
    return BuildTime(release(), "the suite's Release file")


def parse_release_date(text: str) -> int | None:
    """The Date field of a Release (or InRelease) file, in seconds since 1970."""
    for line in text.splitlines():
        if line.startswith("Date:"):
            try:
                return int(parsedate_to_datetime(line[5:].strip()).timestamp())
            except (TypeError, ValueError):
                return None
    return None


def release_epoch(mirror: str, suite: str) -> int:
    """The Date of the suite's Release file on the mirror (http, https or file)."""
    import urllib.error
    import urllib.request

    problem = "it has no Date field"
    for name in ("InRelease", "Release"):
        url = f"{mirror.rstrip('/')}/dists/{suite}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                text = response.read(_RELEASE_BYTES).decode(errors="replace")
        except (OSError, ValueError) as e:
            problem = str(getattr(e, "reason", None) or e)
            continue
        epoch = parse_release_date(text)
        if epoch is not None:
            return epoch
    raise HostError(
        f"cannot read the date of {suite}'s Release file from {mirror} ({problem}); check the mirror and the suite, "
        f"or set {SDE_ENV} to the build's time in seconds"
    )


def filesystem_ids(recipe_id: str) -> tuple[str, str]:
    """The filesystem UUID and directory hash seed of the recipe's image, derived from its id."""

    def derived(purpose: str) -> str:
        return ext4.format_uuid(hashlib.sha256(f"apppot {purpose} {recipe_id}".encode()).digest()[:16])

    return derived("filesystem uuid"), derived("directory hash seed")


def fixed_clock(epoch: int) -> dict[str, str]:
    """The environment that fixes e2fsprogs' clock and mke2fs's directory order."""
    return {"E2FSPROGS_FAKE_TIME": str(epoch), SDE_ENV: str(epoch), "LC_ALL": "C"}


def mkfs_argv(label: str, recipe_id: str, root: Path, image: Path, size_bytes: int) -> list[str]:
    """The mkfs.ext4 command line (pure; golden-tested)."""
    fs_uuid, seed = filesystem_ids(recipe_id)
    return [
        "mkfs.ext4", "-q", "-F", "-L", label[:16], "-U", fs_uuid, "-E", f"hash_seed={seed}",
        "-d", str(root), str(image), f"{size_bytes >> 10}k",
    ]  # fmt: skip


def settle_tree(root: Path, epoch: int) -> None:
    """Take out of the built tree what differs from one build to the next, or from one build host to another."""
    _no_ssh_host_keys(root)
    machine_id = root / "etc/machine-id"
    if machine_id.is_file() and not machine_id.is_symlink() and machine_id.stat().st_size:
        machine_id.write_text("")  # as mmdebstrap leaves it: systemd makes one at boot
    for leftover in ("var/lib/dbus/machine-id", "var/cache/ldconfig/aux-cache"):
        with contextlib.suppress(FileNotFoundError):
            (root / leftover).unlink()
    resolv = root / "etc/resolv.conf"  # mmdebstrap copies the build host's
    if resolv.is_file() and not resolv.is_symlink():
        resolv.write_text(RESOLV_CONF)
    for log in _regular_files(root / "var/log"):
        if log.stat().st_size:
            os.truncate(log, 0)  # keep the files (their owners and modes), not what the build wrote
    for shadow in ("etc/shadow", "etc/shadow-"):
        path = root / shadow
        if path.is_file() and not path.is_symlink():
            text = path.read_text()
            clamped = clamp_shadow(text, epoch)
            if clamped != text:
                path.write_text(clamped)


def clamp_shadow(text: str, epoch: int) -> str:
    """/etc/shadow with no password changed after the build's day (tools write the day they run)."""
    day = epoch // 86400
    lines = []
    for line in text.splitlines(keepends=True):
        fields = line.split(":")
        if len(fields) > 2 and fields[2].isdigit() and int(fields[2]) > day:
            fields[2] = str(day)
        lines.append(":".join(fields))
    return "".join(lines)


def _no_ssh_host_keys(root: Path) -> None:
    """No SSH host keys in the image (each build makes new ones, and every copy of an image would share
    them): where the image has systemd, a unit makes them before sshd starts, once per machine."""
    ssh = root / "etc/ssh"
    keys = sorted(ssh.glob("ssh_host_*_key")) + sorted(ssh.glob("ssh_host_*_key.pub")) if ssh.is_dir() else []
    for key in keys:
        key.unlink()
    if not keys or not (root / "lib/systemd/system/ssh.service").exists():
        return
    system = root / "etc/systemd/system"
    (system / "ssh.service.requires").mkdir(parents=True, exist_ok=True)
    (system / SSH_KEYS_UNIT).write_text(_SSH_KEYS_SERVICE)
    os.chmod(system / SSH_KEYS_UNIT, 0o644)
    link = system / "ssh.service.requires" / SSH_KEYS_UNIT
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(f"../{SSH_KEYS_UNIT}")


def _regular_files(top: Path) -> Iterator[Path]:
    if not top.is_dir() or top.is_symlink():
        return
    for directory, _dirs, files in os.walk(top):
        for name in files:
            path = Path(directory, name)
            if stat.S_ISREG(path.lstat().st_mode):
                yield path


def clamp_times(root: Path, epoch: int, *, reset: bool = False) -> None:
    """Every path under root (root too): modified no later than epoch (reset: at epoch), in whole
    seconds; accessed at epoch."""
    found = [(str(root), os.lstat(root))]
    todo = [str(root)]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                found.append((entry.path, entry.stat(follow_symlinks=False)))
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
    for path, st in found:  # after all reading: listing a directory would set its access time again
        _clamp(path, st, epoch, reset)


def _clamp(path: str, st: os.stat_result, epoch: int, reset: bool) -> None:
    second = 1_000_000_000
    mtime = epoch if reset else min(st.st_mtime_ns // second, epoch)
    if (st.st_atime_ns, st.st_mtime_ns) != (epoch * second, mtime * second):
        os.utime(path, ns=(epoch * second, mtime * second), follow_symlinks=False)


def used_inodes(dumpe2fs: str) -> list[int]:
    """The inodes in use, from `dumpe2fs` (per group: "Free inodes: 15973-16384, 16390")."""
    per_group = re.search(r"^Inodes per group:\s+(\d+)", dumpe2fs, re.M)
    if per_group is None:
        raise ValueError("dumpe2fs printed no 'Inodes per group'")
    count = int(per_group.group(1))
    used: list[int] = []
    groups = re.findall(r"^Group (\d+):.*?^\s+Free inodes:([^\n]*)", dumpe2fs, re.M | re.S)
    if not groups:
        raise ValueError("dumpe2fs printed no groups")
    for number, ranges in groups:
        first = int(number) * count + 1
        free: set[int] = set()
        for item in filter(None, (r.strip() for r in ranges.split(","))):
            low, _, high = item.partition("-")
            free.update(range(int(low), int(high or low) + 1))
        used += [ino for ino in range(first, first + count) if ino not in free]
    return used


def pin_inode_times(image: Path, epoch: int, scratch: Path) -> None:
    """Set every used inode's change and access time to epoch (mkfs copied the staging tree's)."""
    listing = run(["dumpe2fs", str(image)], env=fixed_clock(epoch), package="e2fsprogs").stdout.decode()
    first = re.search(r"^First inode:\s+(\d+)", listing, re.M)
    # The reserved inodes below the first (but the root directory) are e2fsprogs' own, with its fixed clock.
    inodes = [ino for ino in used_inodes(listing) if ino == 2 or ino >= (int(first.group(1)) if first else 11)]
    script = scratch / "inode-times"
    script.write_text("".join(f"sif <{ino}> atime @{epoch}\nsif <{ino}> ctime @{epoch}\n" for ino in inodes))
    out = run(["debugfs", "-w", "-f", str(script), str(image)], env=fixed_clock(epoch), package="e2fsprogs")
    errors = [line for line in out.stderr.decode(errors="replace").splitlines() if not line.startswith("debugfs ")]
    if errors:
        raise HostError(f"debugfs could not set the inode times of {image}: {errors[0]}")

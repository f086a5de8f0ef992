"""Room for the guest's disk: free space checked before the boot, the guest's failed disk writes found after it.

Everything the guest writes to its disk goes to a file on the host: UML's COW, QEMU's overlay, or
QEMU's temporary snapshot in TMPDIR. When that file's filesystem is full, the guest's block device
gets a write error; ext4 inside aborts its journal and the job's `dd` and `sync` may still return 0.
So, before the boot, each filesystem the guest's disk and AppPot's run files go to must have a
headroom free; after the job, a write error on the guest's disk (the kernel's own line on the
console) or a filesystem that filled up during the job fails it with one line naming the filesystem.
Both sources are the host's: a report from the guest could be forged or left out.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

from apppot.errors import DiskFull, DiskSpaceError

MIB = 1 << 20
MIN_FREE_ENV = "APPPOT_MIN_FREE"
# The guest's disk can grow by at most the image's size; a job that rewrites more than 256 MiB of its
# system is rare, and a larger headroom would refuse ordinary hosts with large images.
HEADROOM_CAP = 256 * MIB
RUN_FILES_FREE = 4 * MIB  # the control and report files, when TMPDIR holds no disk of the guest
FULL_BELOW = MIB  # free space under which a filesystem that shrank during the job counts as full
# The guest kernel's block-layer lines for its root disk (UML's ubda, QEMU's vda): "critical space
# allocation error, dev ubda", "I/O error, dev vda", "Buffer I/O error on dev(ice) ubda".
# Only where the kernel's own line begins (after its time stamp and a function name such as
# blk_update_request:): the agent's "apppot-agent: running: CMD" line must not count, whatever CMD is.
_DISK_ERROR = re.compile(
    rb"(?m)^(?:\[[ 0-9.]+\] ?)?(?:[a-z_]+: )?"
    rb"(?:critical (?:space allocation|medium|target) error|I/O error|Buffer I/O error)"
    rb"(?:, dev| on dev| on device) (?:ubda|vda)\b"
)
_LINE_BEFORE, _LINE_AFTER = 160, 100  # what of the line around it the message quotes
_SCAN_CHUNK = 1 << 20
_OVERLAP = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Place(NamedTuple):
    """A file of the job's on the host, and what the user is told it is."""

    path: Path  # the file, which may not exist yet: its directory's filesystem counts
    what: str  # e.g. "the COW", "AppPot's run directory (TMPDIR)"
    fix: str  # how to give it more room
    need: int  # bytes that must be free before the boot


class Filesystem(NamedTuple):
    mount_point: str
    fstype: str


def _existing(path: Path) -> Path:
    """path, or its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def filesystem_of(path: Path) -> Filesystem:
    """The mount point and type of the filesystem that holds path (or would hold it), from /proc/self/mountinfo."""
    target = _existing(path).resolve()
    dev = target.stat().st_dev
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    best = Filesystem(str(target), "unknown")
    try:
        lines = Path("/proc/self/mountinfo").read_text(errors="replace").splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 10 or fields[2] != wanted or " - " not in line:
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        fstype = line.split(" - ", 1)[1].split(" ")[0]
        if target.is_relative_to(mount) and (best.fstype == "unknown" or len(mount) > len(best.mount_point)):
            best = Filesystem(mount, fstype)
    return best


def free_bytes(path: Path) -> int:
    """Bytes this user may still write on path's filesystem (root also gets the blocks kept for it)."""
    st = os.statvfs(_existing(path))
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def parse_size(text: str) -> int:
    """'256M', '1G', '0', '4096' (bytes) -> bytes."""
    match = re.fullmatch(r"(\d+)([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if match is None:
        raise DiskSpaceError(
            f"{MIN_FREE_ENV}={text!r} is not a size: give bytes, or a number with K, M, G or T (0 skips the check)"
        )
    return int(match[1]) << (10 * ("KMGT".index(match[2].upper()) + 1) if match[2] else 0)


def headroom(disk_size: int, allocated: int = 0) -> int:
    """What the guest's disk file may still grow by (its size less what is already written), at most HEADROOM_CAP."""
    return max(0, min(HEADROOM_CAP, disk_size - allocated))


def min_free_override() -> int | None:
    """$APPPOT_MIN_FREE in bytes, or None when unset."""
    text = os.environ.get(MIN_FREE_ENV, "").strip()
    return parse_size(text) if text else None


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def check_room(places: list[Place]) -> None:
    """Refuse a job whose disk or run files would not fit: each filesystem must have the sum of its places' needs free."""
    override = min_free_override()
    by_fs: dict[int, list[Place]] = {}
    for place in places:
        by_fs.setdefault(_existing(place.path).stat().st_dev, []).append(place)
    for group in by_fs.values():
        need = sum(p.need for p in group) if override is None else override
        free = free_bytes(group[0].path)
        if free < need:
            place = max(group, key=lambda p: p.need)
            fs = filesystem_of(place.path)
            raise DiskSpaceError(
                f"the filesystem {fs.mount_point} ({place.what}: {place.path}) has {_size(free)} free, less than the "
                f"{_size(need)} the job's disk may need: free space there, {place.fix}, "
                f"or lower the headroom with {MIN_FREE_ENV}=SIZE (0 skips the check)"
            )


def find_disk_error(console_log: Path) -> str | None:
    """The first line in which the guest's kernel says a write to its root disk failed, cleaned for a message."""
    try:
        fd = os.open(console_log, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    tail = b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # --console-log may name a pipe or a terminal: not read back
            return None
        while chunk := os.read(fd, _SCAN_CHUNK):
            data = tail + chunk
            found = _DISK_ERROR.search(data)
            if found is not None:
                start = data.rfind(b"\n", max(0, found.start() - _LINE_BEFORE), found.start()) + 1
                start = max(start, found.start() - _LINE_BEFORE)
                end = data.find(b"\n", found.end(), found.end() + _LINE_AFTER)
                line = data[start : end if end >= 0 else found.end() + _LINE_AFTER]
                return _CONTROL.sub("", line.decode(errors="replace")).strip()
            tail = chunk[-_OVERLAP:]
    finally:
        os.close(fd)
    return None


class DiskWatch:
    """The filesystems of a job's disk and run files, with their free space when the guest started."""

    def __init__(self, disk: Place, others: list[Place]) -> None:
        self.disk = disk
        self.places = [disk, *others]
        self.before = [free_bytes(p.path) for p in self.places]
        self.lowest = list(self.before)  # during the job: QEMU's snapshot, removed when QEMU ends, frees its space

    def sample(self) -> None:
        """Note the free space now (the runner calls it while the guest runs)."""
        self.lowest = [min(low, _free_or(low, p.path)) for low, p in zip(self.lowest, self.places, strict=True)]

    def verdict(self, console_log: Path, job_status: int | None) -> DiskFull | None:
        """Why the guest's disk writes may have been lost, or None when nothing says so."""
        line = find_disk_error(console_log)
        self.sample()
        full = [(p, low) for p, was, low in zip(self.places, self.before, self.lowest, strict=True) if low < min(was, FULL_BELOW)]
        if not full and line is None:
            return None
        status = f"the job's own status was {job_status}" if job_status is not None else "the guest reported no status"
        log = f"console log kept at {console_log}"
        if full:
            place, free = full[0]
            fs = filesystem_of(place.path)
            return DiskFull(
                f"the filesystem {fs.mount_point} holding {place.what} {place.path} is full ({_size(free)} free): "
                f"the guest's writes to its disk may be lost; free space there, or {place.fix} ({status}; {log})"
            )
        fs = filesystem_of(self.disk.path)
        return DiskFull(
            f"the guest could not write its disk, {self.disk.what} {self.disk.path} on the filesystem {fs.mount_point} "
            f"(its kernel says: {line}); check that filesystem's free space and health ({status}; {log})"
        )


def _free_or(default: int, path: Path) -> int:
    try:
        return free_bytes(path)
    except OSError:
        return default


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def qemu_snapshot_dir(run_base: Path) -> Path:
    """Where QEMU puts a temporary snapshot: $TMPDIR, but /var/tmp for /tmp (often a small tmpfs)."""
    return Path("/var/tmp") if str(run_base) == "/tmp" else run_base


def watch(disk: Path, image: Path, rundir: Path, kept: bool) -> DiskWatch:
    """Refuse the job if its disk file or run files would not fit, else watch their filesystems.

    ``disk`` is the guest's disk file (a COW, an overlay, the image itself) or, for QEMU's temporary
    snapshot, the directory it goes to; ``kept`` when the user named it (--cow)."""
    size = image.stat().st_size
    in_place = disk == image.resolve()  # --writable-image: written where it is
    tmpdir_fix = "set TMPDIR to a larger filesystem"
    run_files = Place(rundir, "AppPot's run directory (TMPDIR)", tmpdir_fix, RUN_FILES_FREE)
    if in_place:
        place = Place(disk, "the image", "move the image to a larger filesystem", 0)
    elif kept:
        place = Place(disk, "the COW", "put --cow on a larger filesystem", headroom(size, _allocated(disk)))
    elif disk.is_dir():
        place = Place(disk, "QEMU's temporary snapshot directory", tmpdir_fix + " (QEMU uses /var/tmp for /tmp)", headroom(size))
    else:
        place = Place(disk, "the temporary COW", tmpdir_fix + ", or --cow on a larger one", headroom(size))
    check_room([place, run_files])
    return DiskWatch(place, [run_files])

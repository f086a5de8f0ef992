"""The tiny default appliance: busybox-static and the AppPot agent on ext4.

Built offline in well under a second. Its content is deterministic: the same
busybox, agent and builder give the same image, byte for byte (fixed UUID,
hash seed, timestamps and owners).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError
from apppot.hostcache import cached, file_identity
from apppot.images import ext4
from apppot.images.store import BUILT_ID_SUFFIX, images_dir
from apppot.proc import run

BUILDER_VERSION = "3"
BUSYBOX = "/bin/busybox"
IMAGE_SIZE = "64M"
EPOCH = 1700000000  # every timestamp in the image

_DIRS = {
    "bin": 0o755,
    "sbin": 0o755,
    "usr": 0o755,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "etc": 0o755,
    "dev": 0o755,
    "proc": 0o555,
    "sys": 0o555,
    "run": 0o755,
    "run/apppot": 0o755,
    "run/apppot-agent": 0o700,  # the report directory's parent: the agent's alone
    "run/apppot-agent/out": 0o755,
    "run/apppot-streams": 0o755,
    "tmp": 0o1777,
    "var": 0o755,
    "var/tmp": 0o1777,
    "root": 0o700,
    "home": 0o755,
    "home/user": 0o755,
    "home/user/job": 0o755,
    "mnt": 0o755,
}

_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hostname": "apppot\n",
    "etc/shells": "/bin/sh\n/bin/ash\n",
    "etc/profile": 'export PS1="\\u@\\h:\\w\\$ "\n',
}


class TinyImage(NamedTuple):
    path: Path
    inputs_id: str  # hash of the inputs: names the cached image

    @property
    def name(self) -> str:
        return self.path.name


AGENT = Path(__file__).resolve().parent.parent / "guest" / "apppot-init"


def agent_source() -> bytes:
    return AGENT.read_bytes()


def _busybox() -> Path:
    path = Path(BUSYBOX)
    if not path.is_file():
        raise HostError("busybox is not installed: sudo apt-get install busybox-static")
    return path


def inputs_id() -> str:
    """Hash of everything that goes into the tiny image: builder version, busybox and the agent.

    Hashing costs milliseconds on every job start, so the result is cached per version of both files."""
    busybox = _busybox()
    key = [BUILDER_VERSION, *(file_identity(path) for path in (busybox, AGENT))]

    def compute() -> dict[str, str]:
        return {"sha256": _sha256(b"\0".join([BUILDER_VERSION.encode(), busybox.read_bytes(), agent_source()]))}

    return cached("tiny-inputs", key, compute)["sha256"]


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def image_path() -> Path:
    return images_dir() / f"tiny-{inputs_id()[:16]}.img"


def _stage(root: Path) -> list[str]:
    """Lay out the appliance's tree under root; return its paths, for debugfs."""
    import shutil  # only when building: shutil and tempfile cost milliseconds on every job start

    for d, mode in _DIRS.items():
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, mode)
    shutil.copyfile(_busybox(), root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    applets = run([BUSYBOX, "--list-full"]).stdout.decode().split()
    for applet in applets:
        link = root / applet
        if link.exists() or link.is_symlink() or applet == "bin/busybox":
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath("/bin/busybox", "/" + str(Path(applet).parent)), link)
    for name, text in _FILES.items():
        (root / name).write_text(text)
        os.chmod(root / name, 0o644)
    for name in ("stdin", "stdout", "stderr"):  # the agent's named pipes, so it need not make them
        os.mkfifo(root / "run/apppot-streams" / name, 0o600)
    agent = root / "usr/sbin/apppot-init"
    agent.write_bytes(agent_source())
    os.chmod(agent, 0o755)
    paths = sorted("/" + str(p.relative_to(root)) for p in root.rglob("*"))
    return ["/", "/lost+found", *paths]


def _normalise_script(paths: list[str]) -> str:
    """debugfs commands that give every inode the same times and root ownership."""
    lines = []
    for p in paths:
        for fieldname in ("atime", "mtime", "ctime", "crtime"):
            lines.append(f'sif "{p}" {fieldname} @{EPOCH}')
        lines.append(f'sif "{p}" uid 0')
        lines.append(f'sif "{p}" gid 0')
    return "\n".join(lines) + "\n"


def build(force: bool = False) -> TinyImage:
    """Build the tiny appliance into the cache (or return the cached one)."""
    ident = inputs_id()
    target = image_path()
    if target.exists() and not force:
        return TinyImage(target, ident)
    import tempfile

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise HostError(
            f"cannot build the default appliance into {target.parent}: {e.strerror}; make your cache writable, "
            "set XDG_CACHE_HOME to a writable directory, or ask for it in a site image directory (apppot image publish tiny)"
        ) from None
    fs_uuid = ext4.format_uuid(bytes.fromhex(ident[:32]))
    with tempfile.TemporaryDirectory(prefix="apppot-tiny-", dir=target.parent) as tmp:
        root = Path(tmp) / "root"
        paths = _stage(root)
        staged = Path(tmp) / "image"
        run(
            [
                "mkfs.ext4",
                "-q",
                # 4 KiB blocks, not mke2fs's 1 KiB default for small filesystems: the guest reads
                # busybox in fewer, larger requests, which made `apppot start -- true` ~20 ms faster.
                "-b",
                "4096",
                "-F",
                "-L",
                "apppot-tiny",
                "-U",
                fs_uuid,
                "-E",
                f"hash_seed={fs_uuid},root_owner=0:0",
                "-d",
                str(root),
                str(staged),
                IMAGE_SIZE,
            ],
            env={"E2FSPROGS_FAKE_TIME": str(EPOCH)},
            package="e2fsprogs",
        )
        script = Path(tmp) / "normalise"
        script.write_text(_normalise_script(paths))
        run(["debugfs", "-w", "-f", str(script), str(staged)], package="e2fsprogs")
        ext4.pin_write_time(staged, EPOCH)  # debugfs stamped the time it closed the image
        os.chmod(staged, 0o444)
        # A rebuilt, identical image keeps the same mtime, so COW files made
        # against the old one stay valid.
        os.utime(staged, (EPOCH, EPOCH))
        digest = image_id(staged)
        if force and target.exists():
            target.unlink()
        with contextlib.suppress(FileExistsError):
            os.link(staged, target)  # never replaces an image another job may be using
        _write_id_file(target, digest)  # what a verified start checks it against
    return TinyImage(target, ident)


ID_SUFFIX = BUILT_ID_SUFFIX  # beside the image: its content id when it was built, as sha256sum writes it


def _write_id_file(image: Path, digest: str) -> None:
    from apppot.images.store import replace_file

    replace_file(image.with_suffix(ID_SUFFIX), f"{digest}  {image.name}\n".encode())


def built_id(image: Path) -> str | None:
    """The content id the tiny appliance had when it was built (its ID_SUFFIX file, which `sha256sum -c`
    also reads), or None when it has none (built before AppPot wrote one) or it is not one."""
    from apppot.hostcache import read_record

    return parse_built_id(read_record(image.with_suffix(ID_SUFFIX), limit=ID_FILE_LIMIT) or b"", image)


ID_FILE_LIMIT = 4096


def parse_built_id(data: bytes, image: Path) -> str | None:
    """The content id an ID_SUFFIX file's bytes give the image (a `sha256sum` line naming it), or None."""
    import re

    found = re.fullmatch(rb"([0-9a-f]{64})  (\S+)\n", data)
    return found.group(1).decode() if found and found.group(2) == image.name.encode() else None


def image_id(path: Path) -> str:
    """Content id of an image file: sha256 of its bytes."""
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

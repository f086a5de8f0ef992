"""What a provenance record says about the parts of a job: its backend, kernel, image, changes and command.

Each function returns one section of the record (apppot.record_document) as plain JSON values, and
None for what it cannot know. Measuring never fails the job: a file that cannot be read is recorded
as unknown (None), not raised. Files are hashed with apppot.images.verify.content_id, which caches
each version of a file, so only the first record of an image pays for reading it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from apppot.errors import AppPotError
from apppot.images.verify import content_id

if TYPE_CHECKING:
    from apppot.backends.base import Instance
    from apppot.backends.choice import Decision
    from apppot.snap.checks import ArchiveInfo
    from apppot.spec import JobSpec

Section = dict[str, Any]
T = TypeVar("T")
# The agent's rules (src/apppot/guest/apppot-init), in its order: what runs when no command is given.
JOB_DIR_SCRIPTS = ("apppot-run", "appot-run")
IMAGE_AUTORUN = "/home/user/apppot-autorun"


def _known(measure: Callable[[], T]) -> T | None:
    """measure(), or None when what it reads is gone, unreadable or refused: a record never fails a job."""
    try:
        return measure()
    except (OSError, ValueError, AppPotError):
        return None


def sha256(path: Path | None) -> str | None:
    return None if path is None else _known(lambda: content_id(path))


def backend(spec: JobSpec, decision: Decision | None) -> Section:
    from apppot.backends.choice import requested

    asked, asked_by = _known(lambda: requested(spec.backend, os.environ)) or (None, None)
    return {
        "name": decision.backend.value if decision else None,
        "asked": asked.value if asked else None,
        "asked_by": asked_by,
        "accel": decision.accel.value if decision and decision.accel else None,
        "why": decision.why if decision else None,
    }


def kernel(instance: Instance | None) -> Section | None:
    """The kernel the guest ran: UML's binary with its build record, or QEMU's Debian kernel and initramfs."""
    if instance is None:
        return None
    if instance.name == "QEMU":
        return _qemu_kernel(instance)
    from apppot.backends.uml_instance import UmlInstance
    from apppot.kernel import KernelRecord, kernel_release

    assert isinstance(instance, UmlInstance)
    path = instance.kernel.path
    built = KernelRecord.read(path)  # AppPot's own kernel: `apppot kernel build` kept its record and .config
    config = path.parent / "config"
    return {
        "path": str(path),
        "sha256": sha256(path),
        "found_by": instance.kernel.source.value,
        "release": built.release if built else _known(lambda: kernel_release(path)),
        "config_sha256": sha256(config) if built and config.is_file() else None,
        "source_package": f"{built.source_package} {built.source_version}" if built else None,
        "seccomp": instance.traits.seccomp_works,
        "initrd": None,
    }


def _qemu_kernel(instance: Instance) -> Section:
    from apppot import guest_kernel
    from apppot.backends.qemu_instance import QemuInstance

    assert isinstance(instance, QemuInstance)
    fetched = _known(guest_kernel.installed)
    return {
        "path": str(instance.kernel),
        "sha256": sha256(instance.kernel),
        "found_by": "guest-kernel",
        "release": fetched.release if fetched else None,
        "config_sha256": sha256(fetched.directory / "config") if fetched and (fetched.directory / "config").is_file() else None,
        "source_package": f"{fetched.package} {fetched.version}" if fetched else None,
        "seccomp": None,
        "initrd": {"path": str(instance.initrd), "sha256": sha256(instance.initrd)},
    }


def came_by(text: str | None) -> str:
    """How the image was named, by the rule of apppot.images.store.resolve_image: default, name or path."""
    if text is None:
        return "default"
    if text.startswith("sha256:"):
        return "content-id"
    from apppot.images.recipe import NAME

    return "path" if Path(text).exists() or "/" in text or not NAME.fullmatch(text) else "name"


def image(spec: JobSpec, instance: Instance | None) -> Section:
    path = instance.prepared.image.resolve() if instance else None
    found = sha256(path)
    record = _image_record(path) if path else None
    return {
        "path": str(path) if path else (str(spec.image) if spec.image else None),
        "content_id": found,
        "came_by": came_by(str(spec.image) if spec.image is not None else None),
        "record": record,
        # The image is still what its record says it was built as (None: no record, or unreadable).
        "matches_record": (found == record["content_id"]) if record and record["content_id"] and found else None,
        "installed": installed_packages(path, found) if path and found and record and record["distribution"] else None,
    }


def installed_packages(image: Path, image_id: str) -> list[str] | None:
    """NAME=VERSION of every package dpkg installed in the image (its own status file, not the job's COW),
    read once per content id."""
    from apppot import hostcache
    from apppot.images import ext4

    def compute() -> dict[str, list[str]]:
        return {"packages": parse_dpkg_status(ext4.read_file(image, DPKG_STATUS) or b"")}

    found = _known(lambda: hostcache.cached("installed-packages", [image_id], compute))
    packages = found.get("packages") if found else None  # the cache is the user's to change: checked, not trusted
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        return None
    return packages or None


DPKG_STATUS = "/var/lib/dpkg/status"


def parse_dpkg_status(data: bytes) -> list[str]:
    """NAME=VERSION of the installed packages in a dpkg status file, sorted."""
    packages = []
    for paragraph in data.decode(errors="replace").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in paragraph.splitlines() if ": " in line and not line.startswith(" "))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields and "Version" in fields:
            packages.append(f"{fields['Package']}={fields['Version']}")
    return sorted(packages)


def _image_record(path: Path) -> Section | None:
    from apppot.errors import ImageError
    from apppot.images.store import RECORD_SUFFIX, ImageRecord

    beside = path.with_suffix(RECORD_SUFFIX)
    if path.name.startswith("tiny-") and not beside.exists():
        unknown = dict.fromkeys(("recipe_id", "content_id", "base_id", "distribution", "suite", "built"))
        return {"name": "tiny", **unknown, "packages": []}  # the default appliance keeps no record
    try:
        r = ImageRecord.read(beside)
    except ImageError:
        return None
    return {
        "name": r.name,
        "recipe_id": r.recipe_id,
        "content_id": r.content_id,
        "base_id": r.base_id or None,
        "distribution": r.distribution,
        "suite": r.suite,
        "built": r.built,
        "packages": list(r.packages),
    }


def changes(spec: JobSpec, instance: Instance | None, info: ArchiveInfo | None) -> Section | None:
    """The changes archive merged at boot: what was checked of it (info, measured as it was read before the
    boot: the job may replace the file), None when none was given or found; unknowns when it was not merged."""
    path = instance.prepared.changes if instance else spec.changes
    if path is None:
        return None
    return {
        "path": str(path.absolute()),  # read years later, elsewhere: never relative to where the job ran
        "sha256": info.sha256 if info else None,  # of the bytes merged, read and checked before the boot
        "base_id": info.base if info else None,
        "members": len(info.added) + len(info.modified) if info else None,
        "deleted": len(info.deleted) if info else None,
        "merged_automatically": spec.changes is None,
    }


def command(spec: JobSpec, jobdir: Path | None, image_path: Path | None, interactive: bool) -> Section:
    """The command and which of the four sources gives it, by the agent's rules, seen from the host before the boot."""
    if spec.argv is not None:
        return {"argv": list(spec.argv), "source": "argv"}
    for name in JOB_DIR_SCRIPTS:
        st = _known(lambda name=name: (jobdir / name).stat()) if jobdir else None  # type: ignore[misc]
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return {"argv": [f"./{name}"], "source": "job-directory"}
    if image_path is not None:
        from apppot.images import ext4

        missing = _known(lambda: ext4.missing_paths(image_path, [IMAGE_AUTORUN]))
        if missing == []:
            return {"argv": [IMAGE_AUTORUN], "source": "image-autorun"}
    return {"argv": None, "source": "shell" if interactive else "none"}

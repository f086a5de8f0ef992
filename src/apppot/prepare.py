"""Everything about a job that can be checked before it boots, resolved against this host.

`prepare` turns a JobSpec into a backend instance (apppot.backends.base.Instance): the
checks every backend shares are here (the job directory, checked by apppot.jobdir, the
image, the changes, the COW's use), then the chosen backend adds its own (UML's kernel
and sandbox, QEMU and its accelerator). Nothing here starts the guest; a refusal is one
AppPotError.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from apppot import userpath
from apppot.backends.base import Instance, Prepared
from apppot.backends.choice import Backend, Decision
from apppot.backends.uml import AGENT_SERVICE, SYSTEMD_PATH
from apppot.backends.uml_instance import HOSTFS_SAFE, UmlInstance
from apppot.errors import CowError, HostError, UsageError
from apppot.images import ext4, sites, tiny
from apppot.images.selection import ChosenImage, ImageSource, choose_image, needs_verification, open_verified
from apppot.images.store import cache_dir, find_published_tiny
from apppot.jobdir import check_jobdir, check_not_in_cache, check_outside
from apppot.say import Say
from apppot.spec import DEFAULT_MEM, JobSpec

AUTO_CHANGES = "apppot-changes.tar.gz"  # merged at boot when found in the job directory
_UMID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def default_image(say: Say) -> Path:
    """The tiny appliance: the user's, else the same one published in a site directory, else built now."""
    target = tiny.image_path()
    if target.exists():
        return target
    published = find_published_tiny(target.name)
    if published is not None:
        return published
    say(f"building the default appliance (first use) into {target} ...")
    tiny.build()
    return target


def prepare(spec: JobSpec, say: Say, decision: Decision) -> Instance:
    """Check everything about the job that can be checked before booting, for the backend decided on."""
    jobdir = check_jobdir(spec.jobdir, spec.unsafe_jobdir)
    check_outside(jobdir, run_base(), "the directory for AppPot's run files (TMPDIR)", "set TMPDIR elsewhere")
    _keep_cache_outside(jobdir, say if spec.verbose else None)
    check_outside(jobdir, cache_dir(), "AppPot's cache", "set XDG_CACHE_HOME to a place outside it, or use another --jobdir")
    check_not_in_cache(jobdir, cache_dir())
    for site in sites.site_dirs():  # the images and the kernel every user's jobs run
        fix = f"use another --jobdir, or leave it out of {sites.IMAGE_PATH_ENV}"
        check_outside(jobdir, site, "the site image directory", fix)
    chosen = choose_image(str(spec.image)) if spec.image is not None else ChosenImage(default_image(say), ImageSource.DEFAULT)
    image = chosen.path
    _refuse_writing_published(spec, image)
    fs_uuid = ext4.filesystem_uuid(image)  # also says when the image is missing or unreadable
    changes = spec.changes if spec.changes is not None else _auto_changes(jobdir)
    common = Prepared(image, fs_uuid, jobdir, spec.mem_bytes or DEFAULT_MEM, None, _instance_id(spec), None, changes)
    _check_image_use(spec, image)
    # Last of the checks every backend shares: hashing a large image the first time takes seconds.
    common = common._replace(image_fd=_verified_image(spec, chosen, say))
    try:
        if decision.backend is Backend.QEMU:
            from apppot.backends.qemu_instance import QemuInstance  # not loaded for UML jobs

            return QemuInstance.prepare(spec, say, common, decision)
        return UmlInstance.prepare(spec, say, common)
    except BaseException:
        if common.image_fd is not None:
            os.close(common.image_fd)
        raise


def _verified_image(spec: JobSpec, chosen: ChosenImage, say: Say) -> int | None:
    """The image, opened and checked against its record's content id when it must be (selection.needs_verification);
    always opened under a site's signer policy, whose check (in start) is bound to this descriptor."""
    from apppot.images.signatures import site_policies

    fd = open_verified(chosen, spec.verify, policed=bool(site_policies()))
    if fd is not None and spec.verbose and needs_verification(chosen.source, spec.verify):
        say(f"image: {chosen.path} ({chosen.source}) has its record's content id")
    return fd


def _keep_cache_outside(jobdir: Path, say: Say | None) -> None:
    """Where the cache comes from $HOME and $HOME is (or holds) the job directory, as on ARC, whose jobs get
    their session directory as HOME: this process uses a private cache beside the run directories instead."""
    if os.path.isabs(os.environ.get("XDG_CACHE_HOME", "")) or not cache_dir().resolve().is_relative_to(jobdir):
        return
    private = run_base() / f".apppot-cache-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        private.mkdir(mode=0o700)
    st = private.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise HostError(f"{private} is not a private directory of yours; remove it, or set XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(private)
    if say:
        say(f"$HOME holds the job directory: AppPot's cache for this job is {private / 'apppot'}")


def _instance_id(spec: JobSpec) -> str:
    """--id, checked, or a name made of apppot's pid: UML's umid, QEMU's -name."""
    umid = spec.instance_id or f"apppot-{os.getpid()}"
    if not _UMID.fullmatch(umid):
        raise UsageError(f"invalid --id {umid!r}: use letters, digits, '.', '_' and '-'")
    return umid


def _refuse_writing_published(spec: JobSpec, image: Path) -> None:
    """--writable-image on an image published for every user: its publisher could write it, on everyone."""
    site = sites.site_holding(image) if spec.writable_image else None
    if site is not None:
        raise UsageError(
            f"--writable-image: {image} is published in the site image directory {site} for every user; "
            "change a copy of it (cp it out, --image COPY) and publish that"
        )


def _check_image_use(spec: JobSpec, image: Path) -> None:
    """--full-boot, --writable-image and --cow, against the image (each backend checks what its --cow holds)."""
    if spec.full_boot:
        _check_full_boot(image)
    if spec.writable_image:
        if spec.cow is not None:
            raise UsageError("--writable-image and --cow exclude each other: the job writes either the image or the COW")
        # Also as root: UML opens an image without write permission read-only, and the job would fail later.
        if not os.access(image, os.W_OK) or not image.stat().st_mode & 0o222:
            raise UsageError(
                f"--writable-image: {image} is not writable by you; make it writable (chmod u+w) to change it on purpose"
            )
    if spec.cow is not None:
        if spec.cow.is_symlink():  # a job may have left it: UML and QEMU would write where it points
            raise CowError(f"--cow {spec.cow} is a symbolic link; give the COW file itself, or a new file name")
        userpath.require_file(spec.cow, "--cow", CowError, "give the COW file itself, or a new file name")
        if spec.cow.resolve() == image.resolve():
            raise UsageError("--cow names the base image itself; give a separate file for the COW")


def _auto_changes(jobdir: Path) -> Path | None:
    """apppot-changes.tar.gz in the job directory, merged without being asked for (checked in _put_changes).
    An earlier job may have left it: a link is refused, never followed to a file outside."""
    path = jobdir / AUTO_CHANGES
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        raise UsageError(
            f"{path} is a symbolic link, which AppPot does not follow out of the job directory: "
            "replace it by the archive itself, or pass --changes FILE"
        )
    return path if stat.S_ISREG(mode) else None


def _check_full_boot(image: Path) -> None:
    missing = ext4.missing_paths(image, [SYSTEMD_PATH, AGENT_SERVICE])
    if missing:
        raise UsageError(
            f"--full-boot needs systemd and AppPot's agent service in the image, and {image} lacks {', '.join(missing)}: "
            "build it from a recipe whose packages include systemd, or start it without --full-boot"
        )


def run_base() -> Path:
    """Where run directories go: $TMPDIR, or /tmp where its path could not be given to UML."""
    base = os.environ.get("TMPDIR") or "/tmp"
    return Path(base if HOSTFS_SAFE.fullmatch(base) else "/tmp")

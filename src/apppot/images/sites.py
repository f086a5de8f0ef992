"""Site image directories: images (and a kernel) a site or a colleague published for every user.

$APPPOT_IMAGE_PATH names them, colon-separated, searched in order after the user's own cache;
unset, the one directory /var/lib/apppot/images (missing directories are skipped, as in $PATH).
Everything in them is used read-only: a job's writes go to its own COW or overlay, never beside them.

A site directory is trusted as far as whoever can write it is: a directory, a parent of it or an
image that others than its owner may change (group- or world-writable, without the sticky bit for a
directory) could swap the image or the kernel under every user's job, so it is refused, naming the
path and the fix (chmod go-w).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from apppot.errors import ImageError
from apppot.userpath import kind

IMAGE_PATH_ENV = "APPPOT_IMAGE_PATH"
DEFAULT_SITE_DIR = Path("/var/lib/apppot/images")
KERNEL_DIR = "kernel"  # DIR/kernel/linux (and its kernel.json, config): the kernel published with the images
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def site_dirs() -> list[Path]:
    """The site image directories, in search order (whether or not they exist)."""
    value = os.environ.get(IMAGE_PATH_ENV)
    if value is None:
        return [DEFAULT_SITE_DIR]
    dirs: list[Path] = []
    for part in value.split(":"):
        if not part:
            continue
        if not os.path.isabs(part):
            raise ImageError(f"{IMAGE_PATH_ENV} holds the relative directory {part!r}; give absolute directories")
        if Path(part) not in dirs:
            dirs.append(Path(part))
    return dirs


def existing_site_dirs() -> Iterator[Path]:
    """The site directories that exist, in order, each checked (check_directory) as it comes: an unsafe one
    is an error, once the search gets to it."""
    for directory in site_dirs():
        if directory.is_dir():
            check_directory(directory)
            yield directory


def check_directory(directory: Path) -> None:
    """Refuse a site directory that others than its owner could change: itself, or a parent of it that
    is writable by group or others without the sticky bit (in /tmp only owners rename their files), or a
    parent that belongs to another user (its owner may rename the site directory away, sticky bit or not)."""
    real = directory.resolve()
    owner = real.stat().st_uid
    for path in [real, *real.parents]:
        st = path.stat()
        if path == real and not stat.S_ISDIR(st.st_mode):
            raise ImageError(f"site image directory {directory} is {kind(st.st_mode)}; fix {IMAGE_PATH_ENV}")
        sticky = path != real and st.st_mode & stat.S_ISVTX
        if st.st_mode & _WRITABLE_BY_OTHERS and not sticky:
            raise ImageError(
                f"site image directory {directory}: {path} is writable by others than its owner "
                f"(mode {stat.S_IMODE(st.st_mode):04o}), so anyone could swap the images; "
                f"make it chmod go-w, or leave it out of {IMAGE_PATH_ENV}"
            )
        if st.st_uid not in _trusted_owners(owner):
            raise ImageError(
                f"site image directory {directory}: {path} belongs to uid {st.st_uid}, who could put other images "
                f"in its place; make it root's or the site directory's owner's, or leave it out of {IMAGE_PATH_ENV}"
            )


def _trusted_owners(site_owner: int) -> set[int]:
    """Who may own a site directory's parents and files: root, the site directory's owner, the user."""
    return {0, site_owner, os.geteuid()}


def check_file(path: Path) -> os.stat_result:
    """A published file (image, record, kernel): a regular file, not a link, that only its owner may write,
    owned by root, the directory's owner or the user (any other owner could chmod it at any time)."""
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(
            f"published file {path} is {kind(st.st_mode)}, not a file; its publisher removes it (rm {path}) "
            "and publishes again (apppot image publish)"
        )
    if st.st_mode & _WRITABLE_BY_OTHERS:
        raise ImageError(
            f"published file {path} is writable by others than its owner (mode {stat.S_IMODE(st.st_mode):04o}); "
            "make it chmod go-w, or republish it (apppot image publish)"
        )
    if st.st_uid not in _trusted_owners(path.parent.stat().st_uid):
        raise ImageError(
            f"published file {path} belongs to uid {st.st_uid}, not to the owner of {path.parent}; "
            "republish it as the directory's owner (apppot image publish)"
        )
    return st


def site_holding(path: Path) -> Path | None:
    """The site image directory (of site_dirs()) that path is in, if any: a published image."""
    real = path.resolve()
    for directory in site_dirs():
        with contextlib.suppress(OSError):
            if real.is_relative_to(directory.resolve()):
                return directory
    return None


def site_kernel() -> Path | None:
    """The kernel published in the first site directory that has one (DIR/kernel/linux), checked."""
    for directory in existing_site_dirs():
        candidate = directory / KERNEL_DIR / "linux"
        if candidate.exists() or candidate.is_symlink():
            check_directory(candidate.parent)
            check_file(candidate)
            if os.access(candidate, os.X_OK):
                return candidate.resolve()
    return None

"""apppot-snap: a system's base state, the changes made since, and merging them elsewhere.

    apppot-snap base                  record the whole system's state as its base
    apppot-snap changes [FILE]        pack what differs from the base (default: into the job directory)
    apppot-snap merge FILE            apply such an archive to this system
    apppot-snap manifest FILE         write the system's current state (to compare two systems)

A stdlib-only package: the host imports it (checking, showing and repacking archives), and images
carry it as the zipapp /usr/sbin/apppot-snap (apppot.images.snaptool). The agent merges the host's
repacked archive at boot with sh and tar alone.

A manifest lists every path of the system (not crossing mount points, without /proc, /sys, /dev,
/run, /tmp, the job directory and the paths in /etc/apppot/snap.exclude) with its type, mode,
owner, size, mtime, content digest (or link target) and carried xattrs. A changes archive is a
tar.gz whose first member, .apppot-changes.json, names the base it was made against and the
deletions; the other members are the new and changed files, directories and links, relative to /,
with numeric owners, xattrs as SCHILY.xattr records and sparse files as PAX sparse 1.0 members.
"""

from .archive import DEFAULT_MAX_SIZE, MAX_SIZE_ENV, ArchiveInfo, check_archive, max_size
from .cli import main
from .diff import Changes, diff, topmost
from .manifest import Entry, Manifest, read_manifest, scan, write_manifest
from .merge import merge, repack
from .pack import write_changes
from .paths import (
    BASE_ID,
    BASE_MANIFEST,
    DEFAULT_EXCLUDES,
    DIR,
    EXCLUDE_FILE,
    FILE,
    LINK,
    MANIFEST_MEMBER,
    OTHER,
    STATE_DIR,
    SnapError,
    is_excluded,
    read_excludes,
)

__all__ = [
    "BASE_ID",
    "BASE_MANIFEST",
    "DEFAULT_EXCLUDES",
    "DEFAULT_MAX_SIZE",
    "DIR",
    "EXCLUDE_FILE",
    "FILE",
    "LINK",
    "MANIFEST_MEMBER",
    "MAX_SIZE_ENV",
    "OTHER",
    "STATE_DIR",
    "ArchiveInfo",
    "Changes",
    "Entry",
    "Manifest",
    "SnapError",
    "check_archive",
    "diff",
    "is_excluded",
    "main",
    "max_size",
    "merge",
    "read_excludes",
    "read_manifest",
    "repack",
    "scan",
    "topmost",
    "write_changes",
    "write_manifest",
]

"""Where AppPot keeps its images: the user's cache (XDG), then the site image directories (apppot.images.sites),
addressed by name and by content id.

A built appliance is two files in images_dir(): NAME-RECIPEID.img and NAME-RECIPEID.json, the record
of what went into it. The tiny default appliance is tiny-INPUTSID.img, without a record but for its
content id, tiny-INPUTSID.sha256.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from apppot.bounded import read_at_most
from apppot.errors import ImageError
from apppot.images import sites

RECORD_SUFFIX = ".json"
SIGNATURE_SUFFIX = RECORD_SUFFIX + ".sig"  # the record's signature (apppot.images.signatures), as ssh-keygen names it
BUILT_ID_SUFFIX = ".sha256"  # the tiny appliance's record: its content id when it was built (apppot.images.tiny)


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/apppot, or ~/.cache/apppot. A relative $XDG_CACHE_HOME is ignored, as the XDG
    specification says: it would put the cache wherever the job runs."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = str(Path.home() / ".cache")
    return Path(base) / "apppot"


def images_dir() -> Path:
    return cache_dir() / "images"


Owner = tuple[int, int]  # uid, gid


def cache_owner(directory: Path) -> Owner | None:
    """Who should own what root makes under ``directory``: the owner of its nearest existing parent when
    that is another user (root building into a user's cache: ``sudo env XDG_CACHE_HOME=$HOME/.cache ...``),
    so that the user can still write the cache afterwards; None otherwise."""
    if os.geteuid() != 0:
        return None
    existing = directory
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    st = os.lstat(existing)
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def make_dirs(directory: Path, owner: Owner | None) -> None:
    """``directory`` and its missing parents, those given to ``owner`` when there is one."""
    missing = []
    path = directory
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        for made in reversed(missing):
            os.chown(made, *owner, follow_symlinks=False)


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` (mode 0644) in one rename, from a new file of a name no one can guess (O_EXCL), so
    that no link planted in the cache is followed: root may write a user's cache (image build with sudo)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ImageRecord(NamedTuple):
    """What a built appliance is: written next to its image when the build succeeds."""

    name: str
    recipe: str  # path of the recipe it was built from
    recipe_id: str  # hash of the recipe, the files it names, the agent and the builder
    content_id: str  # sha256 of the image file
    agent: str  # sha256 of the agent installed in it
    protocol: int  # the host-guest protocol version of that agent
    distribution: str
    suite: str
    packages: list[str]
    size_bytes: int  # the filesystem's size (the file is sparse)
    built: str  # UTC, ISO 8601
    build_seconds: float
    base_id: str = ""  # the base state apppot-snap recorded in it (none before AppPot recorded one)
    source_date_epoch: int = 0  # the build's one time, every file's newest (0: built before AppPot fixed one)
    installed: tuple[str, ...] = ()  # every Debian package in it, name[:arch]=version, sorted (as a lock has them)

    @staticmethod
    def read(path: Path) -> ImageRecord:
        """The record in the file ``path``: a regular file of at most RECORD_LIMIT bytes, read without following
        a link or waiting on a FIFO (a record beside a path image is anyone's to plant); else an ImageError."""
        return ImageRecord.parse(_read_record_file(path), path)

    @staticmethod
    def parse(text: bytes, path: Path) -> ImageRecord:
        """The record in ``text``, read from ``path`` (named in the error when it is not one): every field of
        its type, so that no caller meets a number where a content id should be."""
        import json

        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            record = ImageRecord(**{k: data[k] for k in ImageRecord._fields if k in data})
            wrong = [k for k in ImageRecord._fields if not _of_type(getattr(record, k), _FIELD_TYPES[k])]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} not of {'its' if len(wrong) == 1 else 'their'} type")
            return record
        except (ValueError, KeyError, TypeError) as e:
            raise ImageError(f"image record {path} is damaged ({e}); rebuild the image with apppot image build --force") from None

    def write(self, path: Path) -> None:
        import json

        replace_file(path, (json.dumps(self._asdict(), indent=2) + "\n").encode())


RECORD_LIMIT = 4 << 20  # a record lists an appliance's packages: tens of KiB
# What each field of an ImageRecord holds in its JSON (a float field takes an integer too, never a bool).
_FIELD_TYPES: dict[str, object] = {
    **dict.fromkeys(("name", "recipe", "recipe_id", "content_id", "agent", "distribution", "suite", "built", "base_id"), str),
    "protocol": int,
    "size_bytes": int,
    "source_date_epoch": int,
    "build_seconds": float,
    "packages": list[str],
    "installed": list[str],
}


def _of_type(value: object, shape: object) -> bool:
    if shape is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if shape == list[str]:
        return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)  # a default is a tuple
    assert isinstance(shape, type)
    return isinstance(value, shape) and not isinstance(value, bool)


def _read_record_file(path: Path) -> bytes:
    """The bytes of an image record: a link, FIFO, device, directory or file over RECORD_LIMIT is an ImageError,
    never followed, waited on or read whole."""
    import stat

    from apppot.userpath import kind

    fix = "remove it, or rebuild the image with apppot image build --force"
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):  # not even opened: opening a device can do something
            raise ImageError(f"image record {path} is {kind(mode)}, not a file; {fix}")
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageError(f"cannot read the image record {path} ({e.strerror}); {fix}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the lstat
            raise ImageError(f"image record {path} is not a file; {fix}")
        data = read_at_most(fd, RECORD_LIMIT)
    except OSError as e:
        raise ImageError(f"cannot read the image record {path} ({e.strerror}); {fix}") from None
    finally:
        os.close(fd)
    if data is None:
        raise ImageError(f"image record {path} is over {RECORD_LIMIT} bytes, so it is not one; {fix}")
    return data


class StoredImage(NamedTuple):
    path: Path
    record: ImageRecord | None  # None: the tiny default appliance
    site: Path | None = None  # the site image directory it is published in; None: the user's cache

    @property
    def name(self) -> str:
        return self.record.name if self.record else "tiny"


def image_stem(name: str, recipe_id: str) -> str:
    return f"{name}-{recipe_id[:16]}"


def stored_images(site: Path | None = None) -> list[StoredImage]:
    """Every complete image in the user's cache, or in one site image directory, newest first. In a site
    directory every image and record is checked (sites.check_file): one that others could change is an error."""
    directory = images_dir() if site is None else site
    found: list[tuple[float, StoredImage]] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError as e:
        raise ImageError(f"cannot read the image directory {directory}: {e.strerror}; make it readable (chmod +rx)") from None
    for entry in entries:
        if not entry.name.endswith(".img") or entry.name.startswith("."):  # .NAME.tmp: a publish under way
            continue
        path = Path(entry.path)
        record_path = path.with_suffix(RECORD_SUFFIX)
        if record_path.exists():
            if site is not None:
                sites.check_file(record_path)
            try:
                record: ImageRecord | None = ImageRecord.read(record_path)
            except ImageError:
                continue  # a damaged record hides its image, not the others
        elif entry.name.startswith("tiny-"):
            record = None
        else:
            continue  # no record: not one of ours, or a build that did not finish
        st = sites.check_file(path) if site is not None else entry.stat()
        # The tiny appliance's files all carry the same fixed mtime (their content is deterministic):
        # when each was made shows in its inode's change time.
        found.append((st.st_ctime if record is None else _built_key(record), StoredImage(path, record, site)))
    return [image for _, image in sorted(found, key=lambda pair: pair[0], reverse=True)]


def all_images() -> Iterator[StoredImage]:
    """The user's cache, then each site image directory ($APPPOT_IMAGE_PATH) in order: the search order.
    Lazily: a name found in the cache is found without looking at (nor failing on) any site directory."""
    yield from stored_images()
    for directory in sites.existing_site_dirs():
        yield from stored_images(directory)


def _built_key(record: ImageRecord) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(record.built).timestamp()
    except ValueError:
        return 0.0


def find_by_name(name: str) -> StoredImage | None:
    """The image of this name ("tiny": the tiny default appliance) that comes first: the newest in the
    user's cache, else the newest in the first site image directory that has one."""
    return next((image for image in all_images() if image.name == name), None)


def find_published_tiny(file_name: str) -> Path | None:
    """The tiny appliance built from the same inputs (so the same bytes), published in a site directory.
    For the default image only: a site directory that is not safe is passed over (the user builds it)."""
    for directory in sites.site_dirs():
        try:
            sites.check_directory(directory)
            candidate = directory / file_name
            sites.check_file(candidate)
        except (OSError, ImageError):
            continue
        return candidate
    return None


def resolve_image(text: str) -> Path:
    """An --image value: a path to an image file, or the name of an image in the cache or a site directory."""
    path, _ = find_image(text)
    return path


def find_image(text: str) -> tuple[Path, StoredImage | None]:
    """An --image value as resolve_image reads it, and the stored image it names (None: a path)."""
    from apppot.images.recipe import NAME

    path = Path(text)
    if path.exists() or "/" in text or not NAME.fullmatch(text):
        return path, None
    found = find_by_name(text)
    if found is None:
        searched = ", ".join(str(d) for d in sites.site_dirs())
        raise ImageError(
            f"no image file {text} here and no image named {text} in the cache nor in the site image directories "
            f"({searched}; {sites.IMAGE_PATH_ENV}); build it with 'apppot image build RECIPE.toml' (see 'apppot image list')"
        )
    return found.path, found


def remove(name: str, keep_newest: bool) -> tuple[list[tuple[Path, int]], list[Path]]:
    """Remove the cached images built under a name (all, or all but the newest); returns the removed image
    files with the disk space each used, and the image kept. An image a running job uses stays readable
    to it until the job ends (its file is still open)."""
    found = [image for image in stored_images() if image.name == name]
    if not found:
        published = next((image for image in all_images() if image.name == name), None)
        if published is not None:
            raise ImageError(
                f"image {name} is published in the site directory {published.site}, not in your cache; "
                f"its publisher removes it there (rm {published.path} and its .json)"
            )
        raise ImageError(f"no image named {name} in the cache (see apppot image list)")
    removed = []
    for image in found[1:] if keep_newest else found:
        used = 0
        for path in (
            image.path,
            image.path.with_suffix(RECORD_SUFFIX),
            image.path.with_suffix(SIGNATURE_SUFFIX),
            image.path.with_suffix(BUILT_ID_SUFFIX),
        ):
            with contextlib.suppress(OSError):
                used += path.stat().st_blocks * 512
            path.unlink(missing_ok=True)
        removed.append((image.path, used))
    return removed, [image.path for image in found[:1]] if keep_newest else []

"""Which image a job boots, how it was named, and whether its bytes are checked against its record first.

An image named by what the user cannot see (a name looked up in the cache or a site directory, or a
`sha256:PREFIX` content id) is checked before it boots: the name stands for the record's content id, so
the bytes must be that. An image given as a path is checked only when asked (--verify, APPPOT_VERIFY=1):
the user chose that very file. The tiny default appliance, made here from known inputs, likewise. Under a
site's signer policy every image is opened, and the policy's check is made on that open file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from apppot.errors import ImageError, UsageError
from apppot.images import store, tiny, verify
from apppot.images.store import ImageRecord, StoredImage

CONTENT_ID_PREFIX = "sha256:"
MIN_ID_DIGITS = 8  # 32 bits: two of a user's images sharing them by chance is unlikely; sharing is an error anyway
RECORD_LIMIT = 1 << 20  # a record lists the packages: tens of KiB


class ImageSource(StrEnum):
    DEFAULT = "default"  # no --image: the tiny appliance
    PATH = "path"  # --image FILE
    NAME = "name"  # --image NAME, from the cache or a site directory
    CONTENT_ID = "content id"  # --image sha256:PREFIX


class ChosenImage(NamedTuple):
    path: Path
    source: ImageSource
    stored: StoredImage | None = None  # the cache's or a site's image it is, when it was looked up there


def needs_verification(source: ImageSource, asked: bool, policed: bool = False) -> bool:
    """Whether the image is opened and its bytes checked before the boot: named images, --verify, and every
    image under a site's signer policy (``policed``), whose check is bound to the descriptor that boots."""
    return asked or policed or source in (ImageSource.NAME, ImageSource.CONTENT_ID)


def id_prefix(text: str) -> str | None:
    """The hex digits of a `sha256:PREFIX` value (lower case), or None when text does not start with sha256:."""
    if not text.startswith(CONTENT_ID_PREFIX):
        return None
    digits = text[len(CONTENT_ID_PREFIX) :].lower()
    if not re.fullmatch(f"[0-9a-f]{{{MIN_ID_DIGITS},64}}", digits):
        raise UsageError(
            f"image {text}: after sha256: give {MIN_ID_DIGITS} to 64 hex digits of a content id "
            "(the id column of 'apppot image list')"
        )
    return digits


def pick_by_prefix(prefix: str, candidates: Iterable[tuple[str, StoredImage]]) -> StoredImage:
    """The image whose content id starts with prefix, among (content id, image) in search order. Copies of one
    content (the cache's and a site's) are one image: the first is taken, as for a name. Several ids: an error."""
    matching: dict[str, StoredImage] = {}
    for content_id, image in candidates:
        if content_id.startswith(prefix):
            matching.setdefault(content_id, image)
    if not matching:
        raise ImageError(
            f"no image with content id sha256:{prefix} in the cache nor in the site image directories; "
            "see 'apppot image list' for the ids there are"
        )
    if len(matching) > 1:
        listed = ", ".join(f"sha256:{cid[:16]} ({image.name}, {image.path})" for cid, image in matching.items())
        raise ImageError(f"sha256:{prefix} names several images: {listed}; give more digits")
    return next(iter(matching.values()))


def stored_content_id(image: StoredImage) -> str:
    """An image's content id as its record gives it; the tiny appliance's, as built (else its bytes')."""
    if image.record is not None:
        return image.record.content_id
    return tiny.built_id(image.path) or verify.content_id(image.path)


def choose_image(text: str) -> ChosenImage:
    """An --image value: sha256:PREFIX, a file, or a name looked up in the cache and the site directories."""
    prefix = id_prefix(text)
    if prefix is not None:
        found = pick_by_prefix(prefix, ((stored_content_id(image), image) for image in store.all_images()))
        return ChosenImage(found.path, ImageSource.CONTENT_ID, found)
    path, stored = store.find_image(text)
    return ChosenImage(path, ImageSource.PATH if stored is None else ImageSource.NAME, stored)


def expected_content_id(chosen: ChosenImage) -> str:
    """The content id the image's record gives it: the stored image's, else the record beside the file
    (NAME.json), else the record of the stored image at that path; the tiny appliance's as built (NAME.sha256)."""
    stored = chosen.stored or _record_beside(chosen.path) or _stored_at(chosen.path)
    if stored is not None and stored.record is not None:
        return stored.record.content_id
    built = tiny.built_id(chosen.path)
    if built is not None:
        return built
    if stored is not None or chosen.source is ImageSource.DEFAULT:  # the tiny appliance, without its id file
        raise ImageError(
            f"the tiny appliance {chosen.path} has no record of its content id (built before AppPot wrote one): "
            "rebuild it with 'apppot image build-tiny --force' (its publisher: and publish it again)"
        )
    raise ImageError(
        f"image {chosen.path} has no record to verify it against ({chosen.path.with_suffix(store.RECORD_SUFFIX).name} "
        "beside it, nor in the cache or a site directory); boot it without --verify, or use an image built by "
        "'apppot image build'"
    )


def _stored_at(path: Path) -> StoredImage | None:
    real = path.resolve()
    return next((image for image in store.all_images() if image.path.resolve() == real), None)


def _record_beside(path: Path) -> StoredImage | None:
    """The record NAME.json beside NAME.img, read as hostile input (a link, FIFO or huge file is none)."""
    from apppot.hostcache import read_record

    record_path = path.with_suffix(store.RECORD_SUFFIX)
    if record_path == path:
        return None
    data = read_record(record_path, RECORD_LIMIT)
    if data is None:
        return None
    record = ImageRecord.parse(data, record_path)
    if not isinstance(record.content_id, str):
        raise ImageError(f"image record {record_path} has no content id; rebuild the image with apppot image build --force")
    return StoredImage(path, record)


def open_verified(chosen: ChosenImage, asked: bool, policed: bool = False) -> int | None:
    """The image opened and checked against its record when it must be (needs_verification), else None.
    The descriptor is what the boot should use (see verify.open_checked); the caller closes it. Under a
    policy alone the image is opened and its bytes are checked by the policy (signatures.enforce_policy)
    against the content id of the very record bytes whose signature it verified: the record beside an
    image file is the signed one, and a missing record is the policy's refusal to make."""
    if not needs_verification(chosen.source, asked, policed):
        return None
    if not needs_verification(chosen.source, asked):
        return verify.open_image(chosen.path)
    return verify.open_checked(chosen.path, expected_content_id(chosen))

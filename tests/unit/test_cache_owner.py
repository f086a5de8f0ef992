"""Root building into a user's cache (`sudo env XDG_CACHE_HOME=$HOME/.cache apppot image build ...`) leaves
what it made there to that user, who can then still build the tiny appliance and remove images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apppot.images.store import cache_owner, make_dirs

USER = (1001, 1001)


@pytest.fixture
def users_cache(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("only root makes files for another user")
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, *USER)
    return home


def test_directories_root_makes_in_a_users_cache_are_the_users(users_cache: Path) -> None:
    images = users_cache / ".cache" / "apppot" / "images"
    owner = cache_owner(images)
    assert owner == USER
    make_dirs(images, owner)
    for made in (users_cache / ".cache", users_cache / ".cache" / "apppot", images):
        assert (made.stat().st_uid, made.stat().st_gid) == USER, made


def test_roots_own_cache_stays_roots(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        assert cache_owner(tmp_path / "cache") is None  # a user's own files are theirs anyway
        return
    assert cache_owner(tmp_path / "cache" / "apppot" / "images") is None
    make_dirs(tmp_path / "cache" / "apppot" / "images", None)
    assert (tmp_path / "cache" / "apppot").stat().st_uid == 0


def test_a_link_on_the_way_is_not_followed_for_ownership(users_cache: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "roots"
    elsewhere.mkdir()
    (users_cache / ".cache").symlink_to(elsewhere)  # the user's link: its target stays root's
    images = users_cache / ".cache" / "apppot" / "images"
    make_dirs(images, cache_owner(images))
    assert elsewhere.stat().st_uid == 0


def test_an_image_record_is_written_through_no_planted_link(tmp_path: Path) -> None:
    """The old temporary name NAME.json.tmp, planted as a link by the cache's owner, is never written."""
    from apppot.images.store import ImageRecord

    victim = tmp_path / "victim"
    victim.write_text("root's own\n")
    (tmp_path / "x.json.tmp").symlink_to(victim)
    ImageRecord(**dict.fromkeys(ImageRecord._fields)).write(tmp_path / "x.json")  # type: ignore[arg-type]
    assert victim.read_text() == "root's own\n"
    assert (tmp_path / "x.json").is_file() and not (tmp_path / "x.json").is_symlink()

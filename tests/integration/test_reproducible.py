"""Bit-for-bit rebuilds of Debian appliances, and lock files: `debian-dev` built twice (the session's
build and one into another cache) is the same image; a small recipe with files and commands, locked
with --lock, builds the same image again from its lock; a lock naming a version the mirror does not
have fails with one line naming it. No guest is booted: the boot tests use the session's images."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from apppot.images.lock import lock_path, read_lock
from apppot.images.tiny import image_id  # sha256 of an image's bytes
from tests.integration.conftest import EXAMPLES, apppot_cli

SMALL_RECIPE = """\
name = "repro-small"
size = "512M"
packages = ["file"]
# Files the commands make get the build's time (their content is theirs to keep the same: no `date`).
commands = ["echo built > /etc/motd", "mkdir -p /opt/data/made && touch /opt/data/made/here"]

[[files]]
source = "data"
target = "/opt/data/input"
"""


@pytest.fixture
def uml_kernel() -> Iterator[None]:
    """Only builds here: not parametrised over kernels."""
    yield None


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("building Debian appliances needs root (make test runs as root in CI)")


def _build(cache: Path, recipe: Path, *args: str) -> dict[str, object]:
    r = apppot_cli(cache, "image", "build", "--json", *args, str(recipe))
    assert r.returncode == 0, r.err
    record: dict[str, object] = json.loads(r.stdout)
    return record


def test_debian_dev_rebuilds_bit_for_bit(debian_dev: dict[str, object], tmp_path: Path) -> None:
    again = _build(tmp_path / "other-cache", EXAMPLES / "debian-dev.toml")
    first, second = Path(str(debian_dev["path"])), Path(str(again["path"]))
    print(f"debian-dev builds: {debian_dev['build_seconds']} s and {again['build_seconds']} s")
    assert again["recipe_id"] == debian_dev["recipe_id"]
    assert again["source_date_epoch"] == debian_dev["source_date_epoch"]
    assert image_id(second) == image_id(first) == debian_dev["content_id"] == again["content_id"]
    assert again["base_id"] == debian_dev["base_id"]


def _small_recipe(directory: Path) -> Path:
    directory.mkdir()
    (directory / "data").write_text("input\n")
    recipe = directory / "small.toml"
    recipe.write_text(SMALL_RECIPE)
    return recipe


def test_a_lock_is_written_and_the_next_build_installs_exactly_it(tmp_path: Path) -> None:
    recipe = _small_recipe(tmp_path / "recipe")
    locked = _build(tmp_path / "cache-a", recipe, "--lock")
    lock = read_lock(lock_path(recipe))
    assert lock is not None and locked["lock"] == str(lock_path(recipe))
    assert lock.requested == ("file",)
    assert {"file", "sudo", "python3", "mawk", "mount"} <= lock.names()
    assert locked["installed"] == [p.spec for p in lock.packages]
    assert locked["source_date_epoch"] == lock.source_date_epoch
    # The same recipe, now with its lock, in another cache; the recipe's files checked out anew.
    os.utime(recipe.parent / "data", (1, 1))
    again = _build(tmp_path / "cache-b", recipe)
    assert not again["reused"]
    assert again["recipe_id"] == locked["recipe_id"]
    assert again["installed"] == locked["installed"]
    assert image_id(Path(str(again["path"]))) == image_id(Path(str(locked["path"]))) == locked["content_id"]
    # Built from the lock, it is that build: the first cache has it already.
    assert _build(tmp_path / "cache-a", recipe)["reused"]


def test_a_lock_the_mirror_cannot_satisfy_fails_naming_the_packages(tmp_path: Path) -> None:
    recipe = _small_recipe(tmp_path / "recipe")
    text = "\n".join(
        [
            "format: 1",
            "suite: bookworm",
            f"architecture: {subprocess.run(['dpkg', '--print-architecture'], capture_output=True, text=True).stdout.strip()}",
            "source-date-epoch: 1700000000",
            "requested: file",
            "auto: libmagic1",
            "file=1:0.0-apppot-test",
            "mawk=1.3.4.20200120-3.1",  # not checked: the test is about the version the mirror lacks
            "mount=0.0-apppot-test",
            "python3=3.11.2-1+b1",
            "sudo=1.9.13p3-1+deb12u1",
        ]
    )
    lock_path(recipe).write_text(text + "\n")
    r = apppot_cli(tmp_path / "cache", "image", "build", str(recipe))
    assert r.returncode != 0
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("apppot: error: the mirror "), r.err
    assert "file=1:0.0-apppot-test" in last and "mount=0.0-apppot-test" in last
    assert "build with --lock" in last
    assert not list((tmp_path / "cache" / "apppot" / "images").glob("*.img"))

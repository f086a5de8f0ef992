"""Appliance recipes: parsing, checking, identity, the mmdebstrap command and image names."""

from __future__ import annotations

from pathlib import Path

import pytest

from apppot.images import debian, store
from apppot.images.recipe import FileCopy, RecipeError, parse_recipe
from apppot.spec import MIB

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_shipped_examples_parse() -> None:
    for path in sorted((ROOT / "examples").rglob("*.toml")):
        recipe = parse_recipe(path)
        assert recipe.base.distribution == "debian", path


def test_a_full_recipe(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.dat").write_text("1 2 3\n")
    (tmp_path / "run.sh").write_text("#!/bin/sh\necho run\n")
    path = write(
        tmp_path,
        """
name = "chem"
description = "a test"
size = "2G"
packages = ["build-essential", "libc6:amd64", "hello=2.10-3"]
commands = ["echo a > /etc/a", "true"]
autorun = "run.sh"

[base]
suite = "trixie"
mirror = "http://mirror.example/debian"
components = ["main", "contrib"]

[[files]]
source = "data/in.dat"
target = "/opt/in.dat"
mode = "0600"

[[files]]
source = "data"
target = "/opt/data/"
""",
    )
    r = parse_recipe(path)
    assert (r.name, r.description, r.size_bytes) == ("chem", "a test", 2048 * MIB)
    assert (r.base.suite, r.base.mirror, r.base.components) == ("trixie", "http://mirror.example/debian", ("main", "contrib"))
    assert r.packages == ("build-essential", "libc6:amd64", "hello=2.10-3")
    assert r.commands == ("echo a > /etc/a", "true")
    assert r.autorun == "#!/bin/sh\necho run\n"
    assert r.files == (
        FileCopy((tmp_path / "data" / "in.dat").resolve(), "/opt/in.dat", 0o600),
        FileCopy((tmp_path / "data").resolve(), "/opt/data", None),
    )


def test_defaults(tmp_path: Path) -> None:
    r = parse_recipe(write(tmp_path, 'name = "x"\n'))
    assert (r.base.distribution, r.base.suite, r.base.mirror, r.base.components) == ("debian", "bookworm", None, ("main",))
    assert (r.packages, r.commands, r.files, r.autorun, r.size_bytes) == ((), (), (), None, 4096 * MIB)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\npakages = ["a"]\n', r"line 2: unknown key 'pakages' \(known: autorun, .*packages"),
        ('name = "x"\n\n[base]\nsuite = "bookworm"\nsuit = "x"\n', r"line 5: unknown key 'suit' in \[base\]"),
        ('name = "x"\npackages = "gcc"\n', r"line 2: 'packages' must be a list of strings"),
        ('name = "x"\ncommands = [1]\n', r"line 2: 'commands' must be a list of strings"),
        ("name = 3\n", r"line 1: 'name' must be a string, not a number"),
        ('size = "1G"\n', r"'name' is missing; add e.g. name = \"r\""),
        ('name = "Big Name"\n', r"line 1: name 'Big Name' is not allowed"),
        ('name = "x"\nsize = "10M"\n', r"line 2: size '10M' is not a size of at least 256M"),
        ('name = "x"\nsize = "lots"\n', r"line 2: size 'lots'"),
        ('name = "x"\n[base]\ndistribution = "arch"\n', r"line 3: distribution 'arch' is not supported"),
        ('name = "x"\n[base]\nmirror = "ftp.x"\n', r"line 3: mirror 'ftp.x' is not an http"),
        ('name = "x"\npackages = ["gcc; rm -rf /"]\n', r"line 2: package 'gcc; rm -rf /' is not a Debian package name"),
        ('name = "x"\nbase = 1\n', r"line 2: 'base' must be a table"),
        ('name = "x"\nfiles = 1\n', r"line 2: 'files' must be a list of tables"),
        ('name = "x"\n[[files]]\ntarget = "/a"\n', r"line 2: each \[\[files\]\] needs 'source' and 'target'"),
        ('name = "x"\n[[files]]\nsource = "r.toml"\ntarget = "a"\n', r"line 4: target 'a' must be an absolute path"),
        ('name = "x"\n[[files]]\nsource = "r.toml"\ntarget = "/a/../b"\n', r"line 4: target '/a/../b' must be"),
        ('name = "x"\n[[files]]\nsource = "nope"\ntarget = "/a"\n', r"line 3: source .*nope does not exist"),
        (
            'name = "x"\n[[files]]\nsource = "r.toml"\ntarget = "/a"\n'
            '[[files]]\nsource = "r.toml"\ntarget = "/b"\nmode = "rwx"\n',
            r"line 8: mode 'rwx' is not an octal mode",
        ),
        ('name = "x"\n[[files]]\nsource = "r.toml"\ntarget = "/a"\nowner = "me"\n', r"line 5: unknown key 'owner' in \[files\]"),
        ('name = "x"\nautorun = "a.sh"\nautorun_script = "x"\n', r"line 3: give either 'autorun'"),
        ('name = "x"\nautorun = "missing.sh"\n', r"line 2: cannot read the autorun script"),
        ('name = "x"\nname = "y"\n', r"is not valid TOML"),
        ('name = "x"\nsize = ""\n', r"line 2: 'size' is empty"),
        ('name = "x"\n[base]\ncomponents = ["--foo"]\n', r"line 3: component '--foo' is not a Debian archive area"),
    ],
)
def test_bad_recipes_name_the_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(write(tmp_path, text))


def test_a_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        parse_recipe(tmp_path / "nope.toml")


def test_the_recipe_id_follows_the_recipe_and_its_files(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("one")
    path = write(tmp_path, 'name = "x"\n[[files]]\nsource = "f"\ntarget = "/f"\n')
    first = debian.recipe_id(parse_recipe(path))
    assert debian.recipe_id(parse_recipe(path)) == first
    (tmp_path / "f").write_text("two")
    assert debian.recipe_id(parse_recipe(path)) != first
    path.write_text('name = "x"\npackages = ["gcc"]\n[[files]]\nsource = "f"\ntarget = "/f"\n')
    assert debian.recipe_id(parse_recipe(path)) not in (first,)


def test_mmdebstrap_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPPOT_DEBIAN_MIRROR", raising=False)
    r = parse_recipe(write(tmp_path, 'name = "x"\npackages = ["gcc", "sudo"]\ncommands = ["true"]\n'))
    assert debian.mmdebstrap_argv(r, Path("/s"), Path("/r")) == [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        "--verbose",
        "--include=gcc,mawk,mount,python3,sudo",
        "--components=main",
        "--customize-hook=sync-in /s /",
        '--customize-hook=chroot "$1" /bin/sh /root/.apppot-recipe-commands',
        '--customize-hook=rm -f "$1/root/.apppot-recipe-commands"',
        "bookworm",
        "/r",
        "http://deb.debian.org/debian",
    ]
    monkeypatch.setenv("APPPOT_DEBIAN_MIRROR", "http://local/debian")
    r = parse_recipe(write(tmp_path, 'name = "x"\n'))
    argv = debian.mmdebstrap_argv(r, Path("/s"), Path("/r"))
    assert argv[-1] == "http://local/debian"
    assert not any("chroot" in a for a in argv)


def test_image_names_resolve_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images = store.images_dir()
    images.mkdir(parents=True)

    def fake(name: str, rid: str, built: str) -> Path:
        path = images / f"{store.image_stem(name, rid)}.img"
        path.write_bytes(b"")
        record = store.ImageRecord(name, "r.toml", rid, "c" * 64, "a" * 64, 3, "debian", "bookworm", [], 1, built, 1.0, "b" * 64)
        record.write(path.with_suffix(".json"))
        return path

    old = fake("dev", "1" * 64, "2026-01-01T00:00:00Z")
    new = fake("dev", "2" * 64, "2026-02-01T00:00:00Z")
    (images / "dev-3333333333333333.img").write_bytes(b"")  # no record: an unfinished build
    assert store.resolve_image("dev") == new
    assert store.find_by_name("dev") == store.StoredImage(new, store.ImageRecord.read(new.with_suffix(".json")))
    assert [i.path for i in store.stored_images()] == [new, old]
    assert store.resolve_image("./dev") == Path("./dev")  # a path stays a path
    with pytest.raises(Exception, match="no image named other in the cache"):
        store.resolve_image("other")
    # removing: the older ones only, then all
    removed, kept = store.remove("dev", keep_newest=True)
    assert ([path for path, _ in removed], kept) == ([old], [new])
    assert not old.exists() and not old.with_suffix(".json").exists() and new.exists()
    assert [path for path, _ in store.remove("dev", keep_newest=False)[0]] == [new]
    assert store.find_by_name("dev") is None
    with pytest.raises(Exception, match="no image named dev in the cache"):
        store.remove("dev", keep_newest=False)

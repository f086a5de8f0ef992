"""Site image directories: lookup order, name resolution, the checks on what others could change, publishing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from apppot import logdir
from apppot.errors import ImageError
from apppot.images import publish, sites, store
from apppot.kernel import kernels_dir


def with_its_id(image: Path) -> Path:
    """Rewrite the record fake() made so its content id is the image's bytes' (what publish checks)."""
    import hashlib

    record_file = image.with_suffix(".json")
    record = store.ImageRecord.read(record_file)
    record_file.unlink()
    record._replace(content_id=hashlib.sha256(image.read_bytes()).hexdigest()).write(record_file)
    record_file.chmod(0o644)
    return image


def fake(directory: Path, name: str, rid: str, built: str, content: str = "c") -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    path = directory / f"{store.image_stem(name, rid)}.img"
    path.write_bytes(b"image of " + name.encode() + content.encode())
    record = store.ImageRecord(name, "r.toml", rid, content * 64, "a" * 64, 3, "debian", "bookworm", [], 1, built, 1.0)
    record.write(path.with_suffix(".json"))
    for p in (path, path.with_suffix(".json")):
        p.chmod(0o644)
    return path


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    tmp_path.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    site1, site2 = tmp_path / "site1", tmp_path / "site2"
    monkeypatch.setenv(sites.IMAGE_PATH_ENV, f"{site1}::{tmp_path / 'missing'}:{site2}:{site1}")
    return store.images_dir(), site1, site2


def test_the_default_site_directory_and_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sites.IMAGE_PATH_ENV, raising=False)
    assert sites.site_dirs() == [Path("/var/lib/apppot/images")]
    monkeypatch.setenv(sites.IMAGE_PATH_ENV, "")
    assert sites.site_dirs() == []
    monkeypatch.setenv(sites.IMAGE_PATH_ENV, "/a:relative/b")
    with pytest.raises(ImageError, match="relative directory 'relative/b'"):
        sites.site_dirs()


def test_the_cache_comes_first_then_the_sites_in_order(dirs: tuple[Path, Path, Path]) -> None:
    cache, site1, site2 = dirs
    in_site2 = fake(site2, "dev", "2" * 64, "2026-03-01T00:00:00Z")
    assert store.resolve_image("dev") == in_site2
    in_site1 = fake(site1, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    assert store.resolve_image("dev") == in_site1  # the first site directory, although site2's is newer
    in_cache = fake(cache, "dev", "0" * 64, "2025-01-01T00:00:00Z")
    assert store.resolve_image("dev") == in_cache  # the user's own cache before any site
    found = store.find_by_name("dev")
    assert found is not None and found.site is None
    assert [(i.path, i.site) for i in store.all_images()] == [(in_cache, None), (in_site1, site1), (in_site2, site2)]
    only_site = fake(site2, "app", "3" * 64, "2026-01-01T00:00:00Z")
    assert store.resolve_image("app") == only_site
    with pytest.raises(ImageError, match=f"no image named other in the cache nor in the site image directories .*{site2}"):
        store.resolve_image("other")
    with pytest.raises(ImageError, match=f"published in the site directory {site2}"):
        store.remove("app", keep_newest=False)
    assert only_site.exists()


def test_a_site_directory_others_can_write_is_refused(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, site1, _ = dirs
    fake(site1, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    site1.chmod(0o777)
    with pytest.raises(ImageError, match=r"site1 is writable by others than its owner \(mode 0777\).*chmod go-w"):
        store.resolve_image("dev")
    site1.chmod(0o775)
    with pytest.raises(ImageError, match="writable by others"):
        list(store.all_images())
    site1.chmod(0o755)
    tmp_path.chmod(0o777)  # a parent anyone could rename it in
    with pytest.raises(ImageError, match=f"{tmp_path} is writable by others"):
        store.resolve_image("dev")
    tmp_path.chmod(0o1777)  # as /tmp: only owners rename their entries
    assert store.resolve_image("dev").parent == site1
    tmp_path.chmod(0o755)


@pytest.mark.parametrize("what", ["image", "record"])
def test_a_published_file_others_can_write_or_a_link_is_refused(dirs: tuple[Path, Path, Path], what: str) -> None:
    _, site1, _ = dirs
    image = fake(site1, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    target = image if what == "image" else image.with_suffix(".json")
    target.chmod(0o666)
    with pytest.raises(ImageError, match=f"published file {target} is writable by others"):
        store.resolve_image("dev")
    target.chmod(0o644)
    moved = target.with_name("elsewhere")
    target.rename(moved)
    target.symlink_to(moved)
    with pytest.raises(ImageError, match=f"published file {target} is a symbolic link"):
        store.resolve_image("dev")


def test_the_default_image_comes_from_a_site_only_as_the_same_tiny(dirs: tuple[Path, Path, Path]) -> None:
    _, site1, site2 = dirs
    site2.mkdir()
    (site2 / "tiny-0123456789abcdef.img").write_bytes(b"x")
    (site2 / "tiny-0123456789abcdef.img").chmod(0o644)
    site1.mkdir(mode=0o777)
    site1.chmod(0o777)
    (site1 / "tiny-0123456789abcdef.img").write_bytes(b"x")
    # An unsafe site is passed over for the default image (the user can build it), not an error.
    assert store.find_published_tiny("tiny-0123456789abcdef.img") == site2 / "tiny-0123456789abcdef.img"
    assert store.find_published_tiny("tiny-fedcba9876543210.img") is None


def test_publish_copies_with_modes_and_refuses_a_different_image_of_that_name(
    dirs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    cache, _, _ = dirs
    source = fake(cache, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    with open(source, "r+b") as f:  # a sparse image: a hole of 64 MiB, then data
        f.seek(64 << 20)
        f.write(b"end")
    with_its_id(source)
    source.chmod(0o444)
    kernel = kernels_dir() / "v1" / "linux"  # one apppot kernel build made: its record beside it goes too
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"\x7fELF kernel")
    kernel.chmod(0o700)
    (kernel.parent / "kernel.json").write_text("{}")
    target = tmp_path / "pub" / "images"
    said: list[str] = []
    done = publish.publish("dev", target, force=False, kernel=str(kernel), with_kernel=True, say=said.append)
    assert done.image == target / source.name and not done.reused
    assert done.image.read_bytes() == source.read_bytes()
    assert done.image.stat().st_blocks * 512 < 1 << 20  # the hole stayed a hole
    modes = {p.relative_to(target): stat.S_IMODE(p.stat().st_mode) for p in [target, *target.rglob("*")]}
    assert modes == {
        Path("."): 0o755,
        Path(source.name): 0o644,
        Path(source.with_suffix(".json").name): 0o644,
        Path("kernel"): 0o755,
        Path("kernel/linux"): 0o755,
        Path("kernel/kernel.json"): 0o644,
    }
    assert stat.S_IMODE((tmp_path / "pub").stat().st_mode) == 0o755
    again = publish.publish("dev", target, force=False, kernel=str(kernel), with_kernel=True, say=said.append)
    assert again.reused and again.kernel_reused and again.copied_bytes == 0
    # A different image of the same name: refused, then replaced with --force.
    source.with_suffix(".json").unlink()
    source.chmod(0o644)
    source.unlink()
    other = with_its_id(fake(cache, "dev", "2" * 64, "2026-02-01T00:00:00Z", content="d"))
    with pytest.raises(ImageError, match=f"{target} already has a different image named dev .*--force"):
        publish.publish("dev", target, force=False, kernel=str(kernel), with_kernel=True, say=said.append)
    done = publish.publish("dev", target, force=True, kernel=str(kernel), with_kernel=True, say=said.append)
    assert done.replaced == [source.name] and not (target / source.name).exists()
    assert sorted(p.name for p in target.iterdir()) == sorted(["kernel", other.name, other.with_suffix(".json").name])
    # A different kernel there: refused without --force, left alone with --no-kernel.
    kernel.write_bytes(b"\x7fELF another kernel")
    with pytest.raises(ImageError, match=r"different kernel .*--force .*--no-kernel"):
        publish.publish("dev", target, force=False, kernel=str(kernel), with_kernel=True, say=said.append)
    publish.publish("dev", target, force=False, kernel=str(kernel), with_kernel=False, say=said.append)
    assert (target / "kernel" / "linux").read_bytes() == b"\x7fELF kernel"
    assert not any(p.name.endswith(".tmp") for p in target.rglob("*"))


def test_publish_leaves_what_lies_beside_a_kernel_from_elsewhere(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cache, _, _ = dirs
    with_its_id(fake(cache, "dev", "1" * 64, "2026-01-01T00:00:00Z"))
    kernel = tmp_path / "shared-tmp" / "linux"  # e.g. in /tmp, where another user may have put a config beside it
    kernel.parent.mkdir()
    kernel.write_bytes(b"\x7fELF kernel")
    kernel.chmod(0o755)
    (kernel.parent / "config").write_text("CONFIG_PLANTED=y\n")
    (kernel.parent / "kernel.json").write_text("{}")
    target = tmp_path / "pub"
    publish.publish("dev", target, force=False, kernel=str(kernel), with_kernel=True, say=print)
    assert sorted(p.name for p in (target / "kernel").iterdir()) == ["linux"]


def test_publish_into_a_directory_others_can_write_is_refused(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cache, _, _ = dirs
    fake(cache, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ImageError, match="writable by others than its owner"):
        publish.publish("dev", open_dir, force=False, kernel=None, with_kernel=False, say=print)
    with pytest.raises(ImageError, match="no image named nothing to publish"):
        publish.publish("nothing", tmp_path / "x", force=False, kernel=None, with_kernel=False, say=print)


def test_a_site_kernel_is_found_after_the_users_own(dirs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from apppot.kernel import KernelSource, find_kernel

    _, site1, site2 = dirs
    monkeypatch.delenv("APPPOT_KERNEL", raising=False)
    (site2 / "kernel").mkdir(parents=True)
    linux = site2 / "kernel" / "linux"
    linux.write_bytes(b"")
    linux.chmod(0o755)
    site1.mkdir()
    assert find_kernel(None) == (linux.resolve(), KernelSource.SITE)
    linux.chmod(0o777)
    with pytest.raises(ImageError, match="writable by others"):
        find_kernel(None)


def test_console_logs_go_to_the_state_directory_or_a_private_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)  # as RunDir makes it
    fd, path = logdir.open_log("x.log", tmp_path, run_dir, tmp_path / "job")
    os.close(fd)
    assert path == tmp_path / "state" / "apppot" / "logs" / "x.log"
    (tmp_path / "state").chmod(0o500)
    (tmp_path / "state" / "apppot" / "logs").chmod(0o500)
    try:
        if os.geteuid() == 0:  # root writes anyway: a state directory that is a file stands in
            monkeypatch.setenv("XDG_STATE_HOME", str(path))
        fd, fallback = logdir.open_log("y.log", tmp_path, run_dir, tmp_path / "job")
        os.close(fd)
        assert fallback == tmp_path / f"apppot-logs-{os.geteuid()}" / "y.log"
        assert stat.S_IMODE(fallback.parent.stat().st_mode) == 0o700
        fallback.parent.chmod(0o755)  # no longer private (or someone else's): passed over
        fd, last = logdir.open_log("z.log", tmp_path, run_dir, tmp_path / "job")
        os.close(fd)
        assert last == run_dir / "z.log"
    finally:
        (tmp_path / "state").chmod(0o755)
        (tmp_path / "state" / "apppot" / "logs").chmod(0o755)


def _start(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from apppot.cli import main

    code = main(["start", *argv])
    return code, capsys.readouterr().err


def test_a_job_directory_holding_a_site_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The publisher's job, root inside, could write the published kernel (0755, the publisher's) that
    # every user's next job runs, or the images: a site directory is something the host runs.
    job = tmp_path / "job"
    site = job / "published"
    fake(site, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(sites.IMAGE_PATH_ENV, str(site))
    code, err = _start(["--jobdir", str(job), "--image", "dev", "--", "true"], capsys)
    assert code == 125
    assert err.count("\n") == 1
    assert f"site image directory {site} is inside the job directory {job}" in err


def test_writable_image_on_a_published_image_is_refused(
    dirs: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The publisher may write it (0644, theirs): the job would change the image every user runs.
    _, site1, _ = dirs
    published = fake(site1, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    job = tmp_path / "job"
    job.mkdir()
    for image in ("dev", str(published)):
        code, err = _start(["--jobdir", str(job), "--image", image, "--writable-image", "--", "true"], capsys)
        assert code == 125
        assert err.count("\n") == 1
        assert f"--writable-image: {published} is published in the site image directory {site1}" in err


def test_a_parent_owned_by_another_user_is_refused(
    dirs: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner of a parent may rename the site directory away and put another in its place, sticky bit or not.
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    _, site1, _ = dirs
    fake(site1, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    other = tmp_path / "others"
    other.mkdir()
    os.chown(other, 4242, 4242)
    other.chmod(0o1777)  # sticky: protects entries from others, not from the directory's owner
    moved = other / "site1"
    site1.rename(moved)
    monkeypatch.setenv(sites.IMAGE_PATH_ENV, str(moved))
    with pytest.raises(ImageError, match=f"site image directory {moved}: {other} belongs to uid 4242"):
        store.resolve_image("dev")
    other.chmod(0o755)
    with pytest.raises(ImageError, match=f"{other} belongs to uid 4242"):
        store.resolve_image("dev")
    os.chown(other, 0, 0)
    assert store.resolve_image("dev").parent == moved
    os.chown(moved / "dev-1111111111111111.img", 4242, 4242)  # its owner could chmod it at any time
    with pytest.raises(ImageError, match=r"published file .*dev-1111111111111111\.img belongs to uid 4242"):
        store.resolve_image("dev")


def test_publish_with_no_site_directory_is_one_line(
    dirs: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _, _ = dirs
    fake(cache, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    monkeypatch.setenv(sites.IMAGE_PATH_ENV, "")
    with pytest.raises(ImageError, match=r"APPPOT_IMAGE_PATH is empty.*give the directory: apppot image publish dev DIR"):
        publish.publish("dev", None, force=False, kernel=None, with_kernel=False, say=print)


def test_a_site_problem_does_not_stop_an_image_of_ones_own(dirs: tuple[Path, Path, Path]) -> None:
    cache, site1, _ = dirs
    mine = fake(cache, "dev", "0" * 64, "2026-01-01T00:00:00Z")
    fake(site1, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    site1.chmod(0o777)
    assert store.resolve_image("dev") == mine  # found before any site directory is looked at
    with pytest.raises(ImageError, match="writable by others"):
        store.resolve_image("other")
    site1.chmod(0o755)


def test_console_logs_never_go_into_the_job_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on ARC, whose jobs get their session directory as HOME: ~/.local/state is then the job's to
    # shape; it made .local/state/apppot a link to a directory of the user's, where the host would write.
    job = tmp_path / "session"
    elsewhere = tmp_path / "users-files"
    (job / ".local" / "state").mkdir(parents=True)
    elsewhere.mkdir()
    (job / ".local" / "state" / "apppot").symlink_to(elsewhere)
    monkeypatch.setenv("HOME", str(job))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    run_base = tmp_path / "tmp"
    run_dir = run_base / "run"
    run_dir.mkdir(parents=True, mode=0o700)
    fd, path = logdir.open_log("x.log", run_base, run_dir, job)
    os.close(fd)
    assert path == run_base / f"apppot-logs-{os.geteuid()}" / "x.log"
    assert list(elsewhere.iterdir()) == []
    assert logdir.state_logs_dir() not in logdir.log_dirs(run_base, job)
    assert logdir.state_logs_dir() in logdir.log_dirs(run_base, tmp_path / "another-job")


def test_a_killed_jobs_log_is_swept_only_from_private_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # /tmp/apppot-logs-UID made first by another user, as a link to a directory of the user's own.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes-apppot-run-x.log").write_text("the user's own file")
    (tmp_path / f"apppot-logs-{os.geteuid()}").symlink_to(mine)
    logs = logdir.state_logs_dir()
    logs.mkdir(parents=True, mode=0o700)
    (logs / "apppot-1-apppot-run-x.log").write_text("console")
    assert logdir.stale_logs(tmp_path, tmp_path / "job", "apppot-run-x") == [logs / "apppot-1-apppot-run-x.log"]


def test_publishing_over_a_link_left_in_the_site_directory_says_how(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # "republish it" alone sent the publisher round in a circle: publishing reads the directory too.
    cache, site1, _ = dirs
    with_its_id(fake(cache, "dev", "1" * 64, "2026-01-01T00:00:00Z"))
    image = fake(site1, "dev", "1" * 64, "2026-01-01T00:00:00Z")
    image.rename(site1 / "moved")
    image.symlink_to(site1 / "moved")
    with pytest.raises(ImageError, match=f"is a symbolic link, not a file; its publisher removes it \\(rm {image}\\)"):
        publish.publish("dev", site1, force=False, kernel=None, with_kernel=False, say=print)
    image.unlink()
    assert publish.publish("dev", site1, force=False, kernel=None, with_kernel=False, say=print).image == image


def test_publish_help_says_what_it_does_and_where(capsys: pytest.CaptureFixture[str]) -> None:
    from apppot.cli import main

    with pytest.raises(SystemExit):
        main(["image", "publish", "--help"])
    out = capsys.readouterr().out
    assert "every user" in out.split("positional arguments")[0]  # a description, not the usage line alone
    assert "/var/lib/apppot/images" in out and "--image NAME" in out


@pytest.mark.parametrize("what", ["image", "record", "signature", "kernel"])
def test_publish_takes_no_link_nor_special_file_from_the_cache(dirs: tuple[Path, Path, Path], tmp_path: Path, what: str) -> None:
    """Root publishing from a user's cache: a link the user put there (to /etc/shadow, say) is refused, not copied."""
    cache, _, _ = dirs
    image = with_its_id(fake(cache, "dev", "1" * 64, "2026-01-01T00:00:00Z"))
    image.with_suffix(".json.sig").write_text("-----BEGIN SSH SIGNATURE-----\n")
    kernel = kernels_dir() / "v1" / "linux"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"\x7fELF kernel")
    kernel.chmod(0o755)
    secret = tmp_path / "secret"
    secret.write_text("root's secret\n")
    victim = {"image": image, "record": image.with_suffix(".json"), "signature": image.with_suffix(".json.sig")}
    victim["kernel"] = kernel.parent / "kernel.json"
    planted = victim[what]
    if what == "image":  # the image's own bytes: a FIFO (a link would not be listed as an image)
        planted.unlink()
        os.mkfifo(planted)
    else:
        planted.unlink(missing_ok=True)
        planted.symlink_to(secret)
    target = tmp_path / "pub"
    refusal = "no image named dev" if what == "record" else f"{planted}: it is (a symbolic link|a named pipe)"
    with pytest.raises(ImageError, match=refusal):  # a record that is a link makes no image: nothing to publish
        publish.publish("dev", target, force=False, kernel=str(kernel), with_kernel=True, say=print)
    assert not any(p.is_file() and p.read_bytes() == secret.read_bytes() for p in target.rglob("*"))


def test_publish_refuses_an_image_that_is_not_its_records_content_id(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cache, _, _ = dirs
    fake(cache, "dev", "1" * 64, "2026-01-01T00:00:00Z")  # its record's id is not its bytes'
    target = tmp_path / "pub"
    with pytest.raises(ImageError, match="was changed after it was built"):
        publish.publish("dev", target, force=False, kernel=None, with_kernel=False, say=print)
    assert not any(target.glob("*.img"))


def test_publish_checks_the_tiny_appliance_against_its_sha256(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cache, _, _ = dirs
    tiny = cache / "tiny-0123456789abcdef.img"
    tiny.parent.mkdir(parents=True, exist_ok=True)
    tiny.write_bytes(b"tiny bytes")
    tiny.with_suffix(".sha256").write_text(f"{'0' * 64}  {tiny.name}\n")
    target = tmp_path / "pub"
    with pytest.raises(ImageError, match="was changed after it was built"):
        publish.publish("tiny", target, force=False, kernel=None, with_kernel=False, say=print)
    tiny.with_suffix(".sha256").unlink()
    tiny.with_suffix(".sha256").symlink_to(tmp_path / "elsewhere.sha256")
    with pytest.raises(ImageError, match="symbolic link"):
        publish.publish("tiny", target, force=False, kernel=None, with_kernel=False, say=print)

"""Images are what their id says: an image named by name or by sha256:PREFIX (any, with --verify) boots only
when its bytes are its record's content id; a changed one is refused, naming both ids."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import BOTH_BACKENDS, own_kernel_only

uml_kernel = own_kernel_only  # what is checked is the image: one kernel is enough


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def cached_image(cache: Path, name: str, source: Path, content_id: str | None = None) -> Path:
    """A copy of ``source`` in ``cache`` under ``name``, with the record `apppot image build` writes."""
    images = cache / "apppot" / "images"
    images.mkdir(parents=True, exist_ok=True)
    image = images / f"{name}-{hashlib.sha256(name.encode()).hexdigest()[:16]}.img"
    subprocess.run(["cp", "--sparse=always", str(source), str(image)], check=True)
    image.chmod(0o644)
    record = {
        "name": name,
        "recipe": "test",
        "recipe_id": "0" * 64,
        "content_id": content_id or sha256(image),
        "agent": "0" * 64,
        "protocol": 1,
        "distribution": "busybox",
        "suite": "",
        "packages": [],
        "size_bytes": image.stat().st_size,
        "built": "2026-01-01T00:00:00Z",
        "build_seconds": 0.0,
    }
    image.with_suffix(".json").write_text(json.dumps(record))
    return image


def change_keeping_mtime(image: Path) -> None:
    """One byte changed past the filesystem's data, its mtime put back (its ctime cannot be)."""
    st = image.stat()
    with image.open("r+b") as f:
        f.seek(st.st_size - 1)
        f.write(b"\x01")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def cache(tmp_path: Path, cache_home: Path, backend: str) -> Path:
    """A cache of the test's own, with the session's QEMU guest kernel when the test runs under QEMU."""
    path = tmp_path / "cache"
    (path / "apppot").mkdir(parents=True)
    if backend == "qemu":
        (path / "apppot" / "guest-kernel").symlink_to(cache_home / "apppot" / "guest-kernel")
    return path


@BOTH_BACKENDS
def test_image_by_name_runs_and_the_same_image_changed_is_refused_naming_both_ids(
    apppot, backend: str, jobdir: Path, cache: Path, tiny_image: Path
) -> None:
    image = cached_image(cache, "mini", tiny_image)
    recorded = sha256(image)
    env = {"XDG_CACHE_HOME": str(cache)}
    r = apppot(["start", "--image", "mini", "--", "echo", "ran"], cwd=jobdir, env=env)
    assert (r.returncode, r.stdout) == (0, b"ran\n"), r.err
    change_keeping_mtime(image)
    r = apppot(["start", "--image", "mini", "--", "echo", "ran"], cwd=jobdir, env=env)
    assert r.returncode == 125 and r.stdout == b""
    lines = r.err.splitlines()
    assert len(lines) == 1 and recorded[:16] in lines[0] and sha256(image)[:16] in lines[0], r.err
    # The seed's entry point names it the same way.
    seed = apppot(["start", "--apppot", "mini", "echo", "ran"], cwd=jobdir, env=env)
    assert seed.returncode == 125 and recorded[:16] in seed.err


def test_a_path_is_trusted_as_given_unless_verify(apppot, jobdir: Path, cache: Path, tiny_image: Path, tmp_path: Path) -> None:
    image = cached_image(cache, "mini", tiny_image)
    env = {"XDG_CACHE_HOME": str(cache)}
    r = apppot(["start", "--verify", "--image", str(image), "--", "true"], cwd=jobdir, env=env)
    assert r.returncode == 0, r.err
    loose = tmp_path / "loose.img"  # the record beside it: NAME.json
    shutil.copy(image, loose)
    shutil.copy(image.with_suffix(".json"), loose.with_suffix(".json"))
    assert apppot(["start", "--verify", "--image", str(loose), "--", "true"], cwd=jobdir, env=env).returncode == 0
    change_keeping_mtime(loose)
    assert apppot(["start", "--image", str(loose), "--", "true"], cwd=jobdir, env=env).returncode == 0  # no --verify
    r = apppot(["start", "--image", str(loose), "--", "true"], cwd=jobdir, env={**env, "APPPOT_VERIFY": "1"})
    assert r.returncode == 125 and "was changed after it was built" in r.err, r.err
    loose.with_suffix(".json").unlink()
    r = apppot(["start", "--verify", "--image", str(loose), "--", "true"], cwd=jobdir, env=env)
    assert r.returncode == 125 and "has no record to verify it against" in r.err and len(r.err.splitlines()) == 1, r.err


def test_sha256_prefix_selects_an_image_and_refuses_ambiguous_or_unknown_ones(
    apppot, jobdir: Path, cache: Path, tiny_image: Path
) -> None:
    image = cached_image(cache, "mini", tiny_image)
    content_id = sha256(image)
    env = {"XDG_CACHE_HOME": str(cache)}
    listed = json.loads(apppot(["image", "list", "--json"], env=env).stdout)
    shown = next(row["id"] for row in listed if row["name"] == "mini")  # what a user pastes
    r = apppot(["start", "--image", f"sha256:{shown}", "--", "echo", "ran"], cwd=jobdir, env=env)
    assert (r.returncode, r.stdout) == (0, b"ran\n"), r.err
    # Another image whose record's id starts with the same 8 digits: sha256:8DIGITS names both.
    cached_image(cache, "twin", tiny_image, content_id=content_id[:8] + "f" * 56)
    r = apppot(["start", "--image", f"sha256:{content_id[:8]}", "--", "true"], cwd=jobdir, env=env)
    assert r.returncode == 125 and "names several images" in r.err and "mini" in r.err and "twin" in r.err, r.err
    assert apppot(["start", "--image", f"sha256:{content_id[:12]}", "--", "true"], cwd=jobdir, env=env).returncode == 0
    unknown = "0" * 8 if not content_id.startswith("0" * 8) else "1" * 8
    r = apppot(["start", "--image", f"sha256:{unknown}", "--", "true"], cwd=jobdir, env=env)
    assert r.returncode == 125 and "no image with content id" in r.err, r.err
    r = apppot(["start", "--image", "sha256:abc", "--", "true"], cwd=jobdir, env=env)
    assert r.returncode == 125 and "8 to 64 hex digits" in r.err, r.err


def test_the_tiny_appliance_is_checked_against_its_id_as_built(apppot, jobdir: Path, cache: Path, tiny_image: Path) -> None:
    images = cache / "apppot" / "images"
    images.mkdir(parents=True)
    image = images / tiny_image.name
    subprocess.run(["cp", "--sparse=always", str(tiny_image), str(image)], check=True)
    shutil.copy(tiny_image.with_suffix(".sha256"), image.with_suffix(".sha256"))
    assert image.with_suffix(".sha256").read_text() == f"{sha256(tiny_image)}  {image.name}\n"  # as sha256sum writes it
    env = {"XDG_CACHE_HOME": str(cache)}
    assert apppot(["start", "--image", "tiny", "--", "true"], cwd=jobdir, env=env).returncode == 0
    image.chmod(0o644)
    change_keeping_mtime(image)
    r = apppot(["start", "--verify", "--", "true"], cwd=jobdir, env=env)  # the default appliance, under --verify
    assert r.returncode == 125 and sha256(tiny_image)[:16] in r.err and sha256(image)[:16] in r.err, r.err


def test_debian_dev_by_name_and_a_changed_copy(apppot, jobdir: Path, cache: Path, debian_dev: dict[str, object]) -> None:
    built = Path(str(debian_dev["path"]))
    image = cached_image(cache, "dev", built, content_id=str(debian_dev["content_id"]))
    env = {"XDG_CACHE_HOME": str(cache)}
    r = apppot(["start", "--image", "dev", "--", "cat", "/etc/debian_version"], cwd=jobdir, env=env)
    assert r.returncode == 0 and r.stdout.strip(), r.err
    change_keeping_mtime(image)
    r = apppot(["start", "--image", "dev", "--", "true"], cwd=jobdir, env=env)
    assert r.returncode == 125 and str(debian_dev["content_id"])[:16] in r.err and sha256(image)[:16] in r.err, r.err


def test_a_users_own_image_changed_by_that_user_is_refused(apppot, tmp_path: Path, test_user: str, tiny_image: Path) -> None:
    """A plain user cannot put back a changed image's ctime: the cached id of the old version is not taken."""
    import sys

    from tests.conftest import chown_to

    user_cache = tmp_path / f"cache-{test_user}"  # the cache the apppot fixture gives this user
    image = cached_image(user_cache, "mini", tiny_image)
    subprocess.run(["chown", "-R", test_user, str(user_cache)], check=True)
    jobdir = tmp_path / "userjob"
    jobdir.mkdir()
    chown_to(jobdir, test_user)
    time.sleep(2.1)  # a file changed in the last 2 s is not cached: this one is to be
    assert apppot(["start", "--image", "mini", "--", "true"], cwd=jobdir, as_user=test_user).returncode == 0
    assert list((user_cache / "apppot" / "host").glob("content-id-*.json"))  # its id, cached for that version
    change = (
        "import os,sys; p=sys.argv[1]; st=os.stat(p); f=open(p,'r+b'); f.seek(st.st_size-1); f.write(b'\\1'); f.close(); "
        "os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))"
    )
    setpriv = ["setpriv", f"--reuid={test_user}", f"--regid={test_user}", "--init-groups", "--"]
    subprocess.run([*setpriv, sys.executable, "-c", change, str(image)], check=True)
    r = apppot(["start", "--image", "mini", "--", "true"], cwd=jobdir, as_user=test_user)
    assert r.returncode == 125 and sha256(image)[:16] in r.err and "was changed after it was built" in r.err, r.err


def test_root_in_a_users_cache_takes_no_content_id_that_user_planted(
    apppot, jobdir: Path, tmp_path: Path, test_user: str, tiny_image: Path
) -> None:
    """The cache's key is no secret: a user who changes her image can write the entry its new version would have,
    saying the old id. Root using her cache (sudo env XDG_CACHE_HOME=...) hashes the image, and refuses it."""
    import sys

    user_cache = tmp_path / f"cache-{test_user}"
    image = cached_image(user_cache, "mini", tiny_image)
    signed_id = sha256(image)
    subprocess.run(["chown", "-R", test_user, str(user_cache)], check=True)
    time.sleep(2.1)  # settled: an entry for it would be taken
    poison = (
        "import json,os,sys,zlib; p,cache,cid=sys.argv[1:]; st=os.stat(p); f=open(p,'r+b'); f.seek(st.st_size-1); "
        "f.write(b'\\1'); f.close(); st=os.stat(p); "
        "key='\\0'.join(map(str,(st.st_dev,st.st_ino,st.st_size,st.st_mtime_ns,st.st_ctime_ns))); "
        "d=os.path.join(cache,'apppot','host'); os.makedirs(d,exist_ok=True); "
        "open(os.path.join(d,'content-id-%08x.json'%zlib.crc32(key.encode())),'w').write("
        "json.dumps({'key':key,'value':{'sha256':cid}}))"
    )
    setpriv = ["setpriv", f"--reuid={test_user}", f"--regid={test_user}", "--init-groups", "--"]
    subprocess.run([*setpriv, sys.executable, "-c", poison, str(image), str(user_cache), signed_id], check=True)
    assert sha256(image) != signed_id and list((user_cache / "apppot" / "host").glob("content-id-*.json"))
    r = apppot(["start", "--image", "mini", "--", "cat", "/etc/hostname"], cwd=jobdir, env={"XDG_CACHE_HOME": str(user_cache)})
    assert r.returncode == 125 and "was changed after it was built" in r.err and sha256(image)[:16] in r.err, r.err

"""Site-wide AppPot: root installs AppPot for every user, one unprivileged user publishes an image, another runs
it by name, with a plain user's environment (env -i, no /usr/sbin on PATH), also from a read-only cache."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Result, chown_to, open_to_all
from tests.integration.conftest import own_kernel_only

uml_kernel = own_kernel_only  # AppPot's UML kernel only: the one A publishes

TEST_USER_2 = "apppot-test2"  # made by tools/host_setup.py --test, as apppot-test
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"


def as_user(user: str, argv: list[str], env: dict[str, str], cwd: Path) -> Result:
    """argv as user, with exactly env (and the user's HOME): as `env -i` would start it."""
    full = {"PATH": PLAIN_PATH, "HOME": pwd.getpwnam(user).pw_dir, **env}
    command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]
    proc = subprocess.run(command, cwd=cwd, env=full, capture_output=True, timeout=180, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def own_dir(path: Path, user: str, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    chown_to(path, user)
    path.chmod(mode)
    return path


@pytest.fixture
def users(test_user: str) -> tuple[str, str]:
    try:
        pwd.getpwnam(TEST_USER_2)
    except KeyError:
        pytest.skip(f"no user {TEST_USER_2}: run 'make host-test' (tools/host_setup.py --test) as root")
    return test_user, TEST_USER_2


def test_one_user_publishes_and_another_runs_it_by_name(users: tuple[str, str], own_kernel: Path, tmp_path: Path) -> None:
    a, b = users
    open_to_all(tmp_path)
    # The site's administrator installs AppPot for every user (make install-site runs this).
    prefix = tmp_path / "opt-apppot"
    install = subprocess.run(
        [sys.executable, "-m", "apppot.install", "--prefix", str(prefix)], capture_output=True, text=True, check=False
    )
    assert install.returncode == 0, install.stderr
    apppot = str(prefix / "bin" / "apppot")
    site = own_dir(tmp_path / "var-lib-apppot", a) / "images"  # stands in for /var/lib/apppot/images
    a_env = {"XDG_CACHE_HOME": str(own_dir(tmp_path / "cache-a", a)), "XDG_STATE_HOME": str(own_dir(tmp_path / "state-a", a))}
    a_env["APPPOT_IMAGE_PATH"] = str(site)
    a_home = own_dir(tmp_path / "a-work", a)
    built = as_user(a, [apppot, "image", "build-tiny"], a_env, a_home)
    assert built.returncode == 0, built.err
    published = as_user(a, [apppot, "image", "publish", "tiny", "--kernel", str(own_kernel), "--json"], a_env, a_home)
    assert published.returncode == 0, published.err
    record = json.loads(published.stdout)
    image = Path(record["image"])
    assert image.parent == site and record["kernel"] == str(site / "kernel" / "linux") and not record["reused"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [site, image, site / "kernel", site / "kernel" / "linux"]}
    assert modes == {"images": 0o755, image.name: 0o644, "kernel": 0o755, "linux": 0o755}
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    before = sorted(p.relative_to(site) for p in site.rglob("*"))

    # B: an empty cache of B's own, only the site directory and a plain PATH.
    b_cache = own_dir(tmp_path / "cache-b", b)
    b_state = own_dir(tmp_path / "state-b", b)
    b_env = {"XDG_CACHE_HOME": str(b_cache), "XDG_STATE_HOME": str(b_state), "APPPOT_IMAGE_PATH": str(site)}
    job = own_dir(tmp_path / "job-b", b)
    ran = as_user(b, [apppot, "start", "-v", "--image", "tiny", "--", "sh", "-c", "echo hello from uid $(id -u)"], b_env, job)
    assert ran.returncode == 0, ran.err
    assert ran.stdout == f"hello from uid {pwd.getpwnam(b).pw_uid}\n".encode()  # B's own uid inside
    assert f"kernel: {site / 'kernel' / 'linux'} (chosen by site)" in ran.err  # B has no kernel of B's own
    listed = as_user(b, [apppot, "image", "list", "--json"], b_env, job)
    assert [(r["name"], r["where"], r["path"]) for r in json.loads(listed.stdout)] == [("tiny", f"site {site}", str(image))]

    # B's cache and state directory read-only (chmod -w, as B): by name, and the default image, still run.
    cached = sorted(b_cache.rglob("*"))  # what the first run cached (the kernel's traits)
    for d in [b_cache, b_state, *b_cache.rglob("*"), *b_state.rglob("*")]:  # chmod -R a-w
        d.chmod(stat.S_IMODE(d.stat().st_mode) & 0o555)
    for args in (["--image", "tiny"], []):
        ran = as_user(b, [apppot, "start", *args, "--", "echo", "read-only cache"], b_env, job)
        assert (ran.returncode, ran.stdout) == (0, b"read-only cache\n"), ran.err
    assert sorted(b_cache.rglob("*")) == cached  # nothing was written into it

    # B cannot change what A published, neither through AppPot nor directly.
    refused = as_user(b, [apppot, "start", "--writable-image", "--image", "tiny", "--", "true"], b_env, job)
    assert refused.returncode == 125 and "is published in the site image directory" in refused.err, refused.err
    for attempt in (f"echo x >> {image}", f"rm -f {image}", f"touch {site}/other.img", f"echo x > {site}/kernel/linux"):
        assert as_user(b, ["sh", "-c", attempt], {}, job).returncode != 0, attempt
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
    assert sorted(p.relative_to(site) for p in site.rglob("*")) == before  # the jobs wrote nothing beside it

    # A site directory anyone may write is refused, with the fix.
    site.chmod(0o777)
    try:
        unsafe = as_user(b, [apppot, "start", "--image", "tiny", "--", "true"], b_env, job)
    finally:
        site.chmod(0o755)
    assert unsafe.returncode == 125 and "writable by others than its owner" in unsafe.err and "chmod go-w" in unsafe.err


def test_a_read_only_cache_without_the_image_says_what_to_do(users: tuple[str, str], tmp_path: Path) -> None:
    _, b = users
    open_to_all(tmp_path)
    cache = own_dir(tmp_path / "ro-cache", b, 0o555)
    job = own_dir(tmp_path / "job", b)
    env = {"XDG_CACHE_HOME": str(cache), "APPPOT_IMAGE_PATH": "", "APPPOT_KERNEL": os.environ["APPPOT_KERNEL"]}
    r = as_user(b, [str(Path(sys.executable).parent / "apppot"), "start", "--", "true"], env, job)
    assert r.returncode == 125
    lines = r.err.strip().splitlines()
    assert "cannot build the default appliance" in lines[-1] and "apppot image publish tiny" in lines[-1], r.err

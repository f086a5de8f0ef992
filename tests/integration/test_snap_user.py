"""apppot-snap as a plain host user has it: the agent sets up that user at every boot, the user
customises the appliance with sudo, and only the user's own changes are packed and merged."""

from __future__ import annotations

import os
import pwd
import re
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from apppot import snap
from tests.conftest import APPPOT, Result, chown_to, open_to_all
from tests.integration.conftest import own_kernel_only

pytestmark = pytest.mark.uml

uml_kernel = own_kernel_only  # AppPot's UML kernel only

GIB = 1 << 30
# A file capability as the kernel stores it (VFS_CAP_REVISION_2, effective): cap_net_bind_service.
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)


@pytest.fixture
def plain_user(test_user: str, tmp_path: Path, debian_dev: dict[str, object]):
    """Runs `apppot start --image DEBIAN-DEV ARGS` as the unprivileged test user, with a plain user's
    environment and its own empty cache, in a job directory of its own."""
    open_to_all(tmp_path)
    job = tmp_path / "job"
    cache = tmp_path / "cache"
    for d in (job, cache):
        d.mkdir()
        chown_to(d, test_user)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": pwd.getpwnam(test_user).pw_dir,
        "XDG_CACHE_HOME": str(cache),
        "APPPOT_KERNEL": os.environ.get("APPPOT_KERNEL", ""),
    }
    as_user = ["setpriv", f"--reuid={test_user}", f"--regid={test_user}", "--init-groups", "--"]

    def run(*args: str) -> Result:
        argv = [*as_user, APPPOT, "start", "--image", str(debian_dev["path"]), *args]
        proc = subprocess.run(argv, cwd=job, env=env, capture_output=True, timeout=900, check=False)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    run.job = job  # type: ignore[attr-defined]
    return run


def test_one_added_file_is_the_only_change_after_two_boots(plain_user, tmp_path: Path) -> None:
    cow = str(plain_user.job / "mine.cow")
    r = plain_user("--cow", cow, "--", "sh", "-c", "sudo sh -c 'echo mine >/opt/added.txt'; echo ls >>$HOME/.bash_history")
    assert r.returncode == 0, r.err
    r = plain_user(
        "--cow", cow, "--", "sh", "-c", "sudo apppot-snap changes -n && sudo apppot-snap changes /home/user/job/c.tar.gz"
    )
    assert r.returncode == 0, r.err
    assert r.stdout.decode().splitlines()[0] == "add /opt/added.txt"
    info, members = snap.check_archive(str(plain_user.job / "c.tar.gz"))
    assert (info.added, info.modified, info.deleted, [m.name for m in members]) == (["/opt/added.txt"], [], [], ["opt/added.txt"])


def test_xattrs_and_a_sparse_file_go_through_changes_and_merge(plain_user, tmp_path: Path) -> None:
    make = (
        "import os\n"
        "open('/opt/tool', 'wb').write(b'tool')\n"
        "os.setxattr('/opt/tool', 'user.origin', b'mine')\n"
        f"os.setxattr('/opt/tool', 'security.capability', {CAPABILITY!r})\n"
        "with open('/opt/disk.img', 'wb') as f:\n"
        f"    f.truncate({GIB}); f.seek({GIB // 2}); f.write(b'data' * 1024)\n"
    )
    (plain_user.job / "make.py").write_text(make)
    r = plain_user(
        "--cow", str(plain_user.job / "mine.cow"), "--", "sh", "-c", "sudo python3 make.py && sudo apppot-snap changes c.tar.gz"
    )
    assert r.returncode == 0, r.err
    archive = plain_user.job / "c.tar.gz"
    assert archive.stat().st_size < 64 << 10
    check = (
        "import os\n"
        "print(os.getxattr('/opt/tool', 'user.origin'))\n"
        "print(os.getxattr('/opt/tool', 'security.capability').hex())\n"
        "st = os.stat('/opt/disk.img')\n"
        f"f = open('/opt/disk.img', 'rb'); f.seek({GIB // 2})\n"
        "print(st.st_size, st.st_blocks * 512 < (1 << 20), f.read(8))\n"
    )
    (plain_user.job / "check.py").write_text(check)
    (plain_user.job / "mine.cow").unlink()
    r = plain_user("--changes", str(archive), "--", "python3", "check.py")  # a fresh COW of the pristine image
    assert r.returncode == 0, r.err
    assert r.stdout.decode().splitlines() == ["b'mine'", CAPABILITY.hex(), f"{GIB} True b'datadata'"]


def test_an_excluded_path_is_never_deleted_and_a_base_recorded_again_warns(plain_user, tmp_path: Path) -> None:
    script = (
        "set -e; sudo mkdir /opt/data; echo keep | sudo tee /opt/data/f >/dev/null; sudo apppot-snap base; "
        "echo /opt/data | sudo tee -a /etc/apppot/snap.exclude >/dev/null; sudo apppot-snap changes -n"
    )
    r = plain_user("--", "sh", "-c", script)
    assert r.returncode == 0, r.err
    assert r.stdout.decode().splitlines()[-1:] == ["modify /etc/apppot/snap.exclude"]
    assert re.search(
        r"^apppot-snap: WARNING: replacing the base state /var/lib/apppot/base.manifest.gz \(base [0-9a-f]{16}\)", r.err, re.M
    )
    assert re.search(rb"base [0-9a-f]{16} recorded in /var/lib/apppot/base.manifest.gz", r.stdout)


def test_a_base_recorded_in_a_cow_is_stable_and_explained_on_the_pristine_image(plain_user, tmp_path: Path) -> None:
    cow = str(plain_user.job / "mine.cow")
    ids = []
    for _ in range(2):
        r = plain_user("--cow", cow, "--", "sh", "-c", "sudo touch /opt/once; sudo apppot-snap base")
        assert r.returncode == 0, r.err
        found = re.search(rb"base ([0-9a-f]{16}) recorded", r.stdout)
        assert found is not None
        ids.append(found.group(1))
    assert ids[0] == ids[1]
    r = plain_user("--cow", cow, "--", "sh", "-c", "sudo touch /opt/later && sudo apppot-snap changes c.tar.gz")
    assert r.returncode == 0, r.err
    r = plain_user("--changes", str(plain_user.job / "c.tar.gz"), "--", "true")
    assert r.returncode == 125
    assert f"made against base {ids[0].decode()}, but this system is base" in r.err
    assert "merge it with the COW it was made in" in r.err
    tarfile.open(plain_user.job / "c.tar.gz").close()

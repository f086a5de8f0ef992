"""The README's "QEMU/KVM, exported images and clouds" block, pasted as a new user would (issue 16).

In one scratch directory, as the unprivileged test user with a plain environment and a cache of
their own: both backends, the doctor, an export, a cloud seed and a bare QEMU boot by firmware of
what they made. Following it so once wrote a 601 MB seed holding the exported disk.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import APPPOT, ROOT, chown_to
from tests.integration.conftest import own_kernel_only
from tests.integration.test_appliance_session import PLAIN_PATH, user_home
from tests.readme import example, run

pytestmark = pytest.mark.qemu

uml_kernel = own_kernel_only  # the block's UML runs on the user's `linux` in any case: run it once
BOOT_TIMEOUT_S = 300  # the bare QEMU boot, emulated (TCG)
RUN_SH = '#!/bin/sh\necho "hello from run.sh in $(uname -s) on $(uname -m)"\n'


def user_bin(home: Path, test_user: str) -> Path:
    """A directory holding `apppot` for the test user: the venv's where the user can run it, else the same
    sources with the system's python3 (the venv's interpreter may be out of the user's reach)."""
    bin_dir = home / "bin"
    bin_dir.mkdir()
    # Through a shell, as the user's commands run (setpriv's own exec of it may succeed where theirs do not).
    as_user = ["setpriv", f"--reuid={test_user}", f"--regid={test_user}", "--init-groups", "--"]
    probe = [*as_user, "/bin/sh", "-c", '"$0" --version', APPPOT]
    if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        (bin_dir / "apppot").symlink_to(APPPOT)
    else:
        entry = "import sys; sys.argv[0] = 'apppot'; from apppot.cli import entry; entry()"
        (bin_dir / "apppot").write_text(f'#!/bin/sh\nPYTHONPATH={ROOT / "src"} exec /usr/bin/python3 -c "{entry}" "$@"\n')
        (bin_dir / "apppot").chmod(0o755)
    chown_to(bin_dir, test_user)
    return bin_dir


def test_the_qemu_and_cloud_example_runs_as_pasted(
    cache_home: Path, guest_kernel_cache: Path, tiny_image: Path, test_user: str, tmp_path: Path
) -> None:
    home = user_home(tmp_path, test_user, cache_home)
    scratch = home / "job"
    (scratch / "run.sh").write_text(RUN_SH)
    (scratch / "run.sh").chmod(0o755)
    chown_to(scratch / "run.sh", test_user)
    # The tiny appliance's file for debian-dev: what the block shows is the backends, the export and the
    # seed, which do the same with any appliance (debian-dev is root's to build, and 20 times the disk).
    script = example("qemu-cloud").script(
        {"debian-dev": str(tiny_image), "qemu-system-x86_64": f"timeout {BOOT_TIMEOUT_S} qemu-system-x86_64"}
    )
    env = {
        "PATH": f"{user_bin(home, test_user)}:{PLAIN_PATH}",
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / "cache"),
    }
    ran = run(script, scratch, env, user=test_user, timeout=BOOT_TIMEOUT_S + 600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    hello = "hello from run.sh in Linux on"
    # Both `apppot start` lines, then the job's output on the VM's console (shared with the kernel's).
    assert ran.stdout.count(hello) == 3, ran.stdout[-3000:]
    assert "apppot-agent: job finished with status 0, powering off" in ran.stdout
    # The seed carries the job, not the disk exported beside it.
    assert "apppot: left out of the seed: app.qcow2 (a qcow2 disk image, " in ran.stderr
    assert (scratch / "seed.iso").stat().st_size < 1 << 20

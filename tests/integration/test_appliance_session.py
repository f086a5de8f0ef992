"""The interactive appliance as the seed's transcript shows it (issue 15): a plain host user starts
`apppot-start --apppot job.cow,IMG /bin/bash`, customises the system with `sudo` at the prompt and
records it with `sudo apppot-snap base`; the prompt names the image's host name, not an address.

Driven through tmux as the unprivileged test user; the host name also without a terminal, on the tiny
image, with and without network, under UML (both kernels) and QEMU.
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import APPPOT, ROOT, chown_to, open_to_all
from tests.integration.conftest import BOTH_BACKENDS
from tests.integration.test_session import read_exit, tmux_session, unique_id, wait_for

pytestmark = pytest.mark.uml

PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"  # Debian's PATH for an ordinary user
SESSION_TIMEOUT_S = 120.0  # a QEMU guest under TCG is slow


def seed_start_command(test_user: str, home: Path) -> list[str]:
    """`apppot-start` as the test user runs it: the venv's, or where its interpreter is out of the
    user's reach (under /root), the same sources with the system's python3."""
    as_user = ["setpriv", f"--reuid={test_user}", f"--regid={test_user}", "--init-groups", "--"]
    env = ["env", "-i", f"PATH={PLAIN_PATH}", f"HOME={home}", "TERM=xterm-256color", f"XDG_CACHE_HOME={home / 'cache'}"]
    env += [f"TMPDIR={home / 'tmp'}"]
    env += [f"{key}={os.environ[key]}" for key in ("APPPOT_KERNEL", "APPPOT_BACKEND", "APPPOT_KVM") if key in os.environ]
    venv_start = [*as_user, *env, str(Path(APPPOT).with_name("apppot-start"))]
    if subprocess.run([*venv_start, "--help"], check=False, capture_output=True).returncode == 0:
        return venv_start
    entry = "import sys; sys.argv[0] = 'apppot-start'; from apppot.cli import start_entry; start_entry()"
    return [*as_user, *env, f"PYTHONPATH={ROOT / 'src'}", "/usr/bin/python3", "-c", entry]


def user_home(tmp_path: Path, test_user: str, cache_home: Path) -> Path:
    """A home of the test user's own: job directory, cache (QEMU's guest kernel linked from the session's), TMPDIR."""
    open_to_all(tmp_path)
    home = tmp_path / "home"
    for d in (home, home / "job", home / "tmp", home / "cache", home / "cache" / "apppot"):
        d.mkdir()
        chown_to(d, test_user)
    guest_kernel = cache_home / "apppot" / "guest-kernel"
    if guest_kernel.exists():
        (home / "cache" / "apppot" / "guest-kernel").symlink_to(guest_kernel)
    return home


@BOTH_BACKENDS
def test_sudo_and_apppot_snap_base_at_the_prompt_of_a_seed_session(
    backend: str, cache_home: Path, debian_dev: dict[str, object], test_user: str, tmp_path: Path
) -> None:
    home = user_home(tmp_path, test_user, cache_home)
    umid = unique_id()
    exit_file = tmp_path / "exit-status"
    argv = [*seed_start_command(test_user, home), "--id", umid, "--apppot", f"job.cow,{debian_dev['path']}", "/bin/bash"]
    command = f"{shlex.join(argv)}; echo EXIT=$? > {shlex.quote(str(exit_file))}"
    with tmux_session(tmp_path / "tmux.sock", home / "job", command, umid) as tmux:

        def prompt() -> str:
            lines = [line for line in tmux.screen() if line]
            return lines[-1] if lines and lines[-1].endswith("$") else ""

        first = wait_for(prompt, SESSION_TIMEOUT_S, lambda: f"a shell prompt on {tmux.dump()}")

        tmux.type("sudo touch /usr/local/x && echo touched-$?")
        tmux.wait_line("touched-0", timeout=30)

        tmux.type("sudo apppot-snap base; echo snap-$?")
        tmux.wait_line("snap-0", timeout=SESSION_TIMEOUT_S)
        assert not [line for line in tmux.screen() if "sudo:" in line], tmux.dump()

        tmux.type("hostname; ls -l /var/lib/apppot/base.id /usr/local/x | wc -l")
        tmux.wait_line("apppot")
        tmux.wait_line("2")

        assert first == "user@apppot:~/job$", tmux.dump()  # the image's host name, not the guest's address
        tmux.type("exit 0")
        wait_for(lambda: read_exit(exit_file), 30, lambda: f"apppot-start to end; {tmux.dump()}")
    assert read_exit(exit_file) == "EXIT=0"
    assert (home / "job" / "job.cow").is_file()
    assert pwd.getpwuid((home / "job" / "job.cow").stat().st_uid).pw_name == test_user


@BOTH_BACKENDS
@pytest.mark.parametrize("net", ["--net", "--no-net"])
def test_the_host_name_is_the_images(apppot, backend: str, net: str, jobdir: Path, tmp_path: Path) -> None:
    r = apppot(["start", net, "--", "hostname"], cwd=jobdir, timeout=SESSION_TIMEOUT_S)
    assert (r.returncode, r.stdout) == (0, b"apppot\n"), r.err


def test_the_host_name_follows_the_images_etc_hostname_and_falls_back_to_apppot(apppot, jobdir: Path) -> None:
    cow = ["--cow", str(jobdir.parent / "names.cow")]
    for content, expected in [
        ("lab-7.example.org\n", "lab-7.example.org"),
        ("# the lab's node\n\n  node42  \n", "node42"),
        ("", "apppot"),
        ("bad_name!\n", "apppot"),
        ("-dash\n", "apppot"),
        ("x" * 65 + "\n", "apppot"),
    ]:
        (jobdir / "hostname").write_text(content)
        written = apppot(["start", *cow, "--user", "root", "--", "cp", "hostname", "/etc/hostname"], cwd=jobdir)
        assert written.returncode == 0, written.err
        r = apppot(["start", *cow, "--no-net", "--", "hostname"], cwd=jobdir)
        assert (r.returncode, r.stdout.decode()) == (0, expected + "\n"), (content, r.err)
    written = apppot(["start", *cow, "--user", "root", "--", "rm", "/etc/hostname"], cwd=jobdir)
    assert written.returncode == 0, written.err
    r = apppot(["start", *cow, "--", "hostname"], cwd=jobdir)
    assert (r.returncode, r.stdout) == (0, b"apppot\n"), r.err


@BOTH_BACKENDS
def test_the_job_has_a_pty_file_system(apppot, backend: str, jobdir: Path) -> None:
    """What sudo's use_pty and every terminal program (script, ssh, tmux) open: /dev/ptmx and /dev/pts."""
    script = "test -c /dev/ptmx && test -e /dev/pts/ptmx && grep ' /dev/pts devpts ' /proc/mounts | wc -l"
    r = apppot(["start", "--", "sh", "-c", script], cwd=jobdir, timeout=SESSION_TIMEOUT_S)
    assert (r.returncode, r.stdout) == (0, b"1\n"), r.err


@pytest.mark.parametrize("full_boot", [[], ["--full-boot"]], ids=["agent-as-init", "full-boot"])
def test_a_debian_appliance_has_its_host_name_and_one_devpts(
    apppot, full_boot: list[str], jobdir: Path, debian_services: dict[str, object]
) -> None:
    """With the agent as init it mounts devpts and names the host; after systemd's boot (which did both) it
    leaves them as they are."""
    # New terminals belong to the group tty (gid 5 in Debian), readable by nobody else.
    script = "hostname; grep ' /dev/pts devpts ' /proc/mounts | grep -o 'gid=5,mode=620' | uniq -c"
    r = apppot(["start", "--image", "debian-services", *full_boot, "--", "sh", "-c", script], cwd=jobdir)
    assert (r.returncode, r.stdout) == (0, b"apppot\n      1 gid=5,mode=620\n"), r.err

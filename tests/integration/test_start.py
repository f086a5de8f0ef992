"""`apppot start` with real User-mode Linux boots of the tiny appliance."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import APPPOT, chown_to
from tests.integration.conftest import BOTH_BACKENDS

pytestmark = pytest.mark.uml


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@BOTH_BACKENDS
def test_the_readme_job(apppot, backend: str, jobdir: Path) -> None:
    (jobdir / "input.dat").write_bytes(b"0123456789")
    r = apppot(["start", "--", "sh", "-c", "wc -c < input.dat > result.txt; echo done"], cwd=jobdir)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"done\n", b"")
    assert (jobdir / "result.txt").read_text().strip() == "10"


@pytest.mark.parametrize("code", [0, 1, 7, 255])
@BOTH_BACKENDS
def test_exit_status_is_the_jobs(apppot, backend: str, jobdir: Path, code: int) -> None:
    assert apppot(["start", "--", "sh", "-c", f"exit {code}"], cwd=jobdir).returncode == code


@BOTH_BACKENDS
def test_job_killed_by_a_signal(apppot, backend: str, jobdir: Path) -> None:
    assert apppot(["start", "--", "sh", "-c", "kill -9 $$"], cwd=jobdir).returncode == 128 + 9


@BOTH_BACKENDS
def test_missing_command_inside_the_guest(apppot, backend: str, jobdir: Path) -> None:
    r = apppot(["start", "--", "no-such-program"], cwd=jobdir)
    assert r.returncode == 127
    assert b"no-such-program" in r.stderr


@BOTH_BACKENDS
def test_arguments_arrive_byte_exact(apppot, backend: str, jobdir: Path) -> None:
    tricky = ["two words", "'q' \"d\"", "$HOME `id`", "new\nline", "ütf-8 ✓", "", "*", "a'b"]
    many = [f"argument-{i:04d}-" + "y" * 50 for i in range(1000)]  # 64 KiB and more
    argv = tricky + many
    r = apppot(["start", "--", "sh", "-c", 'printf "%s\\0" "$@"', "sh", *argv], cwd=jobdir)
    assert r.returncode == 0, r.err
    assert r.stdout.split(b"\0")[:-1] == [a.encode() for a in argv]


@BOTH_BACKENDS
def test_stdin_from_a_pipe_is_byte_exact(apppot, backend: str, jobdir: Path) -> None:
    data = os.urandom(10 * 1000 * 1000)
    r = apppot(["start", "--", "sha256sum"], cwd=jobdir, stdin=data, timeout=300)
    assert r.returncode == 0, r.err
    assert r.stdout.split()[0].decode() == sha(data)


@BOTH_BACKENDS
def test_stdin_from_a_file_and_from_dev_null(apppot, backend: str, jobdir: Path, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    with source.open("rb") as f:
        r = apppot(["start", "--", "sh", "-c", "cat > copy.bin; echo eof-seen"], cwd=jobdir, stdin=f.fileno())
    assert (r.returncode, r.stdout) == (0, b"eof-seen\n")
    assert (jobdir / "copy.bin").read_bytes() == data
    r = apppot(["start", "--", "sh", "-c", "wc -c"], cwd=jobdir)  # stdin is /dev/null
    assert r.stdout.strip() == b"0"


@BOTH_BACKENDS
def test_stdout_and_stderr_are_separate_and_byte_exact(apppot, backend: str, jobdir: Path) -> None:
    out, err = os.urandom(10 * 1000 * 1000), os.urandom(10 * 1000 * 1000)
    (jobdir / "out.bin").write_bytes(out)
    (jobdir / "err.bin").write_bytes(err)
    r = apppot(["start", "--", "sh", "-c", "cat out.bin; cat err.bin >&2"], cwd=jobdir, timeout=300)
    assert r.returncode == 0
    assert sha(r.stdout) == sha(out)
    assert sha(r.stderr) == sha(err)


@BOTH_BACKENDS
def test_boot_messages_go_to_the_console_log(apppot, backend: str, jobdir: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    r = apppot(["start", "--console-log", str(log), "--", "echo", "hi"], cwd=jobdir)
    assert (r.stdout, r.stderr) == (b"hi\n", b"")
    text = log.read_text(errors="replace")
    assert "apppot-agent: job finished with status 0" in text


def test_verbose_shows_the_log_path(apppot, jobdir: Path) -> None:
    r = apppot(["start", "-v", "--", "true"], cwd=jobdir)
    assert r.returncode == 0
    assert "console log:" in r.err and "ubd0=" in r.err


@BOTH_BACKENDS
def test_jobdir_option(apppot, backend: str, jobdir: Path, tmp_path: Path) -> None:
    r = apppot(["start", "--jobdir", str(jobdir), "--", "sh", "-c", "pwd; touch made-here"], cwd=tmp_path)
    assert r.stdout == b"/home/user/job\n"
    assert (jobdir / "made-here").exists()


@BOTH_BACKENDS
def test_apppot_run_in_the_job_directory(apppot, backend: str, jobdir: Path) -> None:
    script = jobdir / "apppot-run"
    script.write_text("#!/bin/sh\necho from-apppot-run\nexit 4\n")
    script.chmod(0o755)
    r = apppot(["start"], cwd=jobdir)
    assert (r.returncode, r.stdout) == (4, b"from-apppot-run\n")
    # The command line still wins.
    assert apppot(["start", "--", "echo", "cli"], cwd=jobdir).stdout == b"cli\n"


@BOTH_BACKENDS
def test_no_command_without_a_terminal_is_an_error(apppot, backend: str, jobdir: Path) -> None:
    r = apppot(["start"], cwd=jobdir)
    assert r.returncode == 125
    assert r.err.startswith("apppot: error: no command to run: ") and r.err.count("\n") == 1, r.err  # as the host's refusals


@BOTH_BACKENDS
def test_named_cow_keeps_changes_and_runs_the_images_autorun(
    apppot, backend: str, jobdir: Path, tmp_path: Path, tiny_image: Path
) -> None:
    before = sha(tiny_image.read_bytes())
    mine = tmp_path / "mine.cow"
    install = "printf '#!/bin/sh\\necho autorun-ran\\n' > /home/user/apppot-autorun; chmod 755 /home/user/apppot-autorun"
    assert apppot(["start", "--cow", str(mine), "--user", "root", "--", "sh", "-c", install], cwd=jobdir).returncode == 0
    r = apppot(["start", "--cow", str(mine)], cwd=jobdir)
    assert (r.returncode, r.stdout) == (0, b"autorun-ran\n")
    # Seed syntax for the same thing.
    r = apppot(["start", "--apppot", f"{mine},{tiny_image}"], cwd=jobdir)
    assert r.stdout == b"autorun-ran\n"
    # Without the COW the image is pristine: nothing to run.
    assert apppot(["start"], cwd=jobdir).returncode == 125
    assert sha(tiny_image.read_bytes()) == before


def test_cow_against_another_or_modified_base_is_refused(apppot, jobdir: Path, tmp_path: Path, tiny_image: Path) -> None:
    mine = tmp_path / "mine.cow"
    assert apppot(["start", "--cow", str(mine), "--", "true"], cwd=jobdir).returncode == 0
    copy = tmp_path / "copy.img"
    shutil.copyfile(tiny_image, copy)
    os.chmod(copy, 0o644)
    subprocess.run(["tune2fs", "-U", "random", str(copy)], check=True, capture_output=True)
    r = apppot(["start", "--image", str(copy), "--cow", str(mine), "--", "true"], cwd=jobdir)
    assert r.returncode == 125 and "belongs to another image" in r.err
    modified = tmp_path / "modified.img"
    shutil.copy2(tiny_image, modified)  # same filesystem, then touched
    os.utime(modified)
    r = apppot(["start", "--image", str(modified), "--cow", str(mine), "--", "true"], cwd=jobdir)
    assert r.returncode == 125 and "before it changed" in r.err
    not_cow = tmp_path / "notes.txt"
    not_cow.write_text("precious")
    r = apppot(["start", "--cow", str(not_cow), "--", "true"], cwd=jobdir)
    assert r.returncode == 125 and "not a UML copy-on-write file" in r.err
    assert not_cow.read_text() == "precious"


@BOTH_BACKENDS
def test_many_jobs_share_one_base(apppot, backend: str, tmp_path: Path) -> None:
    dirs = []
    for i in range(3):
        d = tmp_path / f"job{i}"
        d.mkdir()
        dirs.append(d)

    def one(i: int) -> tuple[int, bytes]:
        r = apppot(["start", "--", "sh", "-c", f"echo {i} > /tmp/mine; sleep 1; cat /tmp/mine"], cwd=dirs[i])
        return r.returncode, r.stdout

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, range(3)))
    assert results == [(0, f"{i}\n".encode()) for i in range(3)]


@BOTH_BACKENDS
def test_temporary_files_are_removed(apppot, backend: str, jobdir: Path) -> None:
    assert apppot(["start", "--", "true"], cwd=jobdir).returncode == 0
    assert list(apppot.tmp.iterdir()) == []


@BOTH_BACKENDS
def test_job_runs_as_the_host_user(apppot, backend: str, tmp_path: Path, test_user: str) -> None:
    import pwd

    pw = pwd.getpwnam(test_user)
    jobdir = tmp_path / "userjob"
    jobdir.mkdir()
    chown_to(jobdir, test_user)
    r = apppot(["start", "--", "sh", "-c", "id -u; id -g; id -un; touch made"], cwd=jobdir, as_user=test_user)
    assert r.returncode == 0, r.err
    assert r.stdout.decode().split() == [str(pw.pw_uid), str(pw.pw_gid), "user"]
    assert (jobdir / "made").stat().st_uid == pw.pw_uid
    r = apppot(["start", "--user", "alice", "--group", "lab", "--", "sh", "-c", "id -un; id -gn"], cwd=jobdir, as_user=test_user)
    assert r.stdout == b"alice\nlab\n"


def test_an_image_with_sudo_gives_the_job_user_passwordless_sudo(apppot, tmp_path: Path, test_user: str) -> None:
    """The agent's part of the seed's sudo behaviour: a sudoers entry for the job's user (real sudo: Debian images)."""
    jobdir = tmp_path / "sudojob"
    jobdir.mkdir()
    chown_to(jobdir, test_user)
    cow = tmp_path / "sudo.cow"
    install = "mkdir -p /etc/sudoers.d && printf '#!/bin/sh\\n' >/usr/bin/sudo && chmod 755 /usr/bin/sudo"
    setup = apppot(["start", "--cow", str(cow), "--user", "root", "--", "sh", "-c", install], cwd=jobdir)
    assert setup.returncode == 0, setup.err
    chown_to(cow, test_user)
    r = apppot(["start", "--cow", str(cow), "--", "stat", "-c", "%a %U", "/etc/sudoers.d/apppot"], cwd=jobdir, as_user=test_user)
    assert (r.returncode, r.stdout) == (0, b"440 root\n"), r.err
    # Only root may read it; the COW keeps what the user's job left. Host root must own the COW too:
    # in the sandbox root has no capability to write another user's file, and AppPot says so first.
    r = apppot(["start", "--cow", str(cow), "--user", "root", "--", "true"], cwd=jobdir)
    assert r.returncode == 125 and "change its owner or mode" in r.err
    shutil.chown(cow, 0, 0)
    r = apppot(["start", "--cow", str(cow), "--user", "root", "--", "cat", "/etc/sudoers.d/apppot"], cwd=jobdir)
    assert r.stdout == b"user ALL=(ALL) NOPASSWD: ALL\n", r.err


def test_unwritable_job_directory(apppot, tmp_path: Path, test_user: str) -> None:
    jobdir = tmp_path / "rojob"
    jobdir.mkdir(mode=0o755)  # owned by root
    r = apppot(["start", "--", "true"], cwd=jobdir, as_user=test_user)
    assert r.returncode == 125
    assert "not writable" in r.err and len(r.err.strip().splitlines()) == 1


def test_unreadable_image(apppot, jobdir: Path, tmp_path: Path, tiny_image: Path, test_user: str) -> None:
    secret = tmp_path / "secret.img"
    shutil.copyfile(tiny_image, secret)
    secret.chmod(0o600)
    chown_to(jobdir, test_user)
    r = apppot(["start", "--image", str(secret), "--", "true"], cwd=jobdir, as_user=test_user)
    assert r.returncode == 125 and "cannot read image" in r.err


ESCAPES = """
mkdir -p /mnt/etc /mnt/up /mnt/next /mnt/root
mount -t hostfs hostfs /mnt/etc -o /etc && ls /mnt/etc
mount -t hostfs hostfs /mnt/up -o /apppot/job/../../../.. && ls -R /mnt/up 2>/dev/null | head -200
mount -t hostfs hostfs /mnt/next -o "$NEXT" && cat /mnt/next
mount -t hostfs hostfs /mnt/root -o / && ls -a /mnt/root
echo ETC-BEGIN; ls -a /mnt/root/etc; echo ETC-END
true
"""


def test_guest_root_cannot_reach_host_files(apppot, tmp_path: Path) -> None:
    jobdir = tmp_path / "job"
    jobdir.mkdir()
    secret = tmp_path / "next-to-job.txt"
    secret.write_text("HOST-SECRET-NEXT-TO-JOB")
    script = ESCAPES.replace("$NEXT", str(secret))
    r = apppot(["start", "--user", "root", "--", "sh", "-c", script], cwd=jobdir)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, r.err
    assert "HOST-SECRET" not in out
    assert "passwd" not in out and "hostname" not in out  # nothing of the host's /etc
    assert "next-to-job" not in out
    assert "home" not in out.split() and "root" not in out.split() and "proc" not in out.split()
    # The sandbox has no /etc of the host (the NAT, which reads resolv.conf, runs outside it).
    etc = out.split("ETC-BEGIN")[1].split("ETC-END")[0].split()
    assert set(etc) <= {".", "..", "resolv.conf"}


# Runs the command after it with its stderr on a terminal of its own (a human watching), copied to this stderr.
ON_A_TERMINAL = """
import os, pty, sys
master, slave = pty.openpty()
pid = os.fork()
if pid == 0:
    os.dup2(slave, 2)
    os.execvp(sys.argv[1], sys.argv[1:])
os.close(slave)
while True:
    try:
        data = os.read(master, 4096)
    except OSError:
        break
    if not data:
        break
    os.write(2, data)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@BOTH_BACKENDS
def test_host_notices_are_said_once_to_a_terminal_before_the_job_then_only_under_v(
    apppot, backend: str, tmp_path: Path, test_user: str
) -> None:
    """The job's stderr is the job's: a condition of the host (no namespaces; under QEMU, no KVM) is said
    only where a human watches (stderr a terminal), once, before the job's output, then only with -v; the
    user's own cache remembers it. A batch job's or a wrapper's stderr (no terminal) never has it, though
    every job starts with a fresh cache (ARC: HOME is the session directory)."""
    job = tmp_path / "notices"
    job.mkdir()
    chown_to(job, test_user)
    env = {"APPPOT_BWRAP": "/nonexistent/bwrap", "APPPOT_KVM": ""}  # under QEMU: KVM probed, TCG where it fails
    command = ["--", "sh", "-c", "echo out; echo job-err >&2; exit 3"]
    batch = apppot(["start", *command], cwd=job, env=env, as_user=test_user)
    assert (batch.returncode, batch.stdout, batch.stderr) == (3, b"out\n", b"job-err\n")
    verbose = apppot(["start", "-v", *command], cwd=job, env=env, as_user=test_user)
    assert verbose.returncode == 3 and "reduced isolation" in verbose.err and verbose.err.endswith("job-err\n")
    terminal = [sys.executable, "-c", ON_A_TERMINAL]
    first = apppot(["start", *command], cwd=job, env=env, as_user=test_user, prefix=terminal)
    assert (first.returncode, first.stdout) == (3, b"out\n"), first.err
    assert "reduced isolation" in first.err and first.err.endswith("job-err\r\n"), first.err
    assert "(said once on this host; -v says it every time; apppot doctor shows it)" in first.err
    again = apppot(["start", *command], cwd=job, env=env, as_user=test_user, prefix=terminal)
    assert (again.returncode, again.stdout, again.stderr) == (3, b"out\n", b"job-err\r\n")
    tcg = "several times slower"
    assert (tcg in first.err) == (tcg in verbose.err) == (backend == "qemu" and "KVM works" not in verbose.err)


def test_reduced_isolation_warns_and_strict_refuses(apppot, jobdir: Path) -> None:
    env = {"APPPOT_BWRAP": "/nonexistent/bwrap"}
    r = apppot(["start", "-v", "--", "echo", "ran"], cwd=jobdir, env=env)
    assert r.returncode == 0 and r.stdout == b"ran\n"
    assert "reduced isolation" in r.err
    r = apppot(["start", "--isolation", "strict", "--", "echo", "ran"], cwd=jobdir, env=env)
    assert r.returncode == 125 and r.stdout == b""
    assert "--isolation strict" in r.err


def test_memory_option(apppot, jobdir: Path) -> None:
    def mem_total_kib(size: str) -> int:
        r = apppot(["start", "--mem", size, "--", "sh", "-c", "grep MemTotal /proc/meminfo"], cwd=jobdir)
        return int(r.stdout.split()[1])

    small, large = mem_total_kib("128M"), mem_total_kib("256M")
    # The guest kernel keeps a part for itself that varies from boot to boot (a few MiB);
    # the totals stay under what was asked and the difference is close to what --mem adds.
    assert 96 * 1024 <= small <= 128 * 1024 and 224 * 1024 <= large <= 256 * 1024
    assert 112 * 1024 <= large - small <= 144 * 1024


def test_too_small_max_map_count_gives_the_guest_what_uml_can_map(apppot, jobdir: Path) -> None:
    # A guest process that maps more pages than vm.max_map_count allows spins for ever (measured with the
    # limit at 200: 40 MB held after fragmenting memory never returned), so the guest gets less, said once.
    if os.getuid() != 0:
        pytest.skip("changing vm.max_map_count needs root")
    path = Path("/proc/sys/vm/max_map_count")
    old = path.read_text()
    try:
        path.write_text("20000\n")
        r = apppot(["start", "--mem", "512M", "--", "sh", "-c", "free -m | sed -n 2p"], cwd=jobdir)
    finally:
        path.write_text(old)
    assert r.returncode == 0, r.err
    assert 50 < int(r.stdout.split()[1]) <= 94  # (20000 pages + 16 MiB), less what the guest kernel keeps
    assert r.err.count("\n") == 1 and "the guest gets 94M" in r.err and "sysctl -w vm.max_map_count=" in r.err


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello-from-the-host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@BOTH_BACKENDS
def test_outbound_network_through_slirp(apppot, backend: str, jobdir: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hello)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # 10.0.2.2 is the host's loopback as slirp shows it to the guest, when asked for (test_network: closed by default).
        r = apppot(["start", "--host-loopback", "--", "wget", "-q", "-O", "-", f"http://10.0.2.2:{port}/"], cwd=jobdir)
        assert (r.returncode, r.stdout) == (0, b"hello-from-the-host\n"), r.err
        r = apppot(["start", "--no-net", "--", "wget", "-q", "-T", "3", "-O", "-", f"http://10.0.2.2:{port}/"], cwd=jobdir)
        assert r.returncode != 0
    finally:
        server.shutdown()


@BOTH_BACKENDS
def test_names_resolve_through_the_nat_and_loopback_is_up(apppot, backend: str, jobdir: Path) -> None:
    # DNS goes to 10.0.2.3, which the user-space NAT forwards to the host's resolver.
    script = (
        "cat /etc/resolv.conf; nslookup deb.debian.org >/dev/null && echo resolved; "
        "ping -c 1 -W 2 127.0.0.1 >/dev/null && echo lo"
    )
    r = apppot(["start", "--net", "--", "sh", "-c", script], cwd=jobdir)
    assert r.returncode == 0, r.err
    assert r.stdout.decode().split("\n")[-3:] == ["resolved", "lo", ""], r.stdout
    assert b"nameserver 10.0.2.3" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--image", "/nonexistent.img"], "does not exist"),
        (["--image", "/etc/passwd"], "not an ext2/3/4 filesystem image"),
        (["--kernel", "/nonexistent/linux"], "not an executable file"),
        (["--frobnicate"], "unrecognized arguments"),
        (["--mem", "lots"], "invalid memory size"),
        (["--jobdir", "/nonexistent/dir"], "does not exist"),
        (["--user", "two words"], "invalid user name 'two words'"),
        (["--user", "a\napppot: forged"], "invalid user name 'a\\napppot: forged'"),
    ],
)
def test_bad_input_gets_one_clear_line(apppot, cache_home: Path, jobdir: Path, args: list[str], message: str) -> None:
    logs = cache_home / "apppot" / "logs"
    before = set(logs.iterdir()) if logs.exists() else set()
    r = apppot(["start", *args, "--", "true"], cwd=jobdir)
    assert r.returncode == 125
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("apppot: error:"), lines
    assert (set(logs.iterdir()) if logs.exists() else set()) == before  # no console log left behind


def test_missing_linux_names_the_package(apppot, jobdir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    r = apppot(["start", "--", "true"], cwd=jobdir, env={"PATH": str(empty), "APPPOT_KERNEL": ""})
    assert r.returncode == 125 and "user-mode-linux" in r.err


def test_default_appliance_is_built_on_first_use(tmp_path: Path) -> None:
    cache = tmp_path / "fresh-cache"
    job = tmp_path / "job"
    job.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    r = subprocess.run([APPPOT, "start", "--", "echo", "ok"], cwd=job, env=env, capture_output=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout == b"ok\n"
    assert b"building the default appliance" in r.stderr


def test_tiny_appliance_is_deterministic(tmp_path: Path, tiny_image: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "other-cache")}
    r = subprocess.run([APPPOT, "image", "build-tiny", "--json"], env=env, capture_output=True, check=True)
    import json

    record = json.loads(r.stdout)
    assert record["id"] == sha(tiny_image.read_bytes())
    r = subprocess.run([APPPOT, "image", "build-tiny", "--force", "--json"], env=env, capture_output=True, check=True)
    assert json.loads(r.stdout)["id"] == record["id"]


def test_apppot_start_is_the_seed_name_for_apppot_start(apppot, jobdir: Path, cache_home: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    start = str(Path(APPPOT).with_name("apppot-start"))
    r = subprocess.run(
        [start, "--", "sh", "-c", "echo seed; exit 3"], cwd=jobdir, env=env, capture_output=True, stdin=subprocess.DEVNULL
    )
    assert (r.returncode, r.stdout) == (3, b"seed\n")


@BOTH_BACKENDS
def test_extra_kernel_parameters_reach_the_guest(apppot, backend: str, jobdir: Path) -> None:
    r = apppot(["start", "--extra", "apppot_probe=xyz", "--extra", "loglevel=3", "--", "cat", "/proc/cmdline"], cwd=jobdir)
    assert r.returncode == 0
    assert b"apppot_probe=xyz" in r.stdout.split() and b"loglevel=3" in r.stdout.split()

"""The QEMU backend, exported images booted by firmware, cloud seeds, KVM probing: real QEMU boots.

QEMU runs under TCG here (the machines' KVM does not boot guests); the behaviour the UML
backend shares is in test_start (BOTH_BACKENDS). Each boot costs about five seconds, so
each test checks several things per boot.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from apppot.backends.qemu import Accel, DiskBus, firmware_boot_argv
from apppot.cli.common import human
from tests.conftest import APPPOT, Result
from tests.integration.conftest import apppot_cli, own_kernel_only
from tests.integration.test_snap import hand_made_archive

pytestmark = pytest.mark.qemu

FIRMWARE_BOOT_TIMEOUT = 180


uml_kernel = own_kernel_only  # AppPot's UML kernel only


@pytest.fixture
def qemu(cache_home: Path, guest_kernel_cache: Path, tiny_image: Path, monkeypatch: pytest.MonkeyPatch):
    """`apppot` with the session's cache, under QEMU with TCG."""
    monkeypatch.setenv("APPPOT_BACKEND", "qemu")
    monkeypatch.setenv("APPPOT_KVM", "0")

    def run(*args: str, cwd: Path, timeout: float = 300) -> Result:
        return apppot_cli(cache_home, *args, cwd=cwd, timeout=timeout)

    return run


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_guest_kernel_is_fetched_from_debian_and_the_fetch_is_announced(tmp_path: Path, tiny_image: Path) -> None:
    cache = tmp_path / "cache"
    job = tmp_path / "job"
    job.mkdir()
    # Offline (a mirror that refuses), auto cannot probe KVM without a guest kernel: it says so, runs the
    # job under UML, and caches no verdict.
    offline = {**os.environ, "XDG_CACHE_HOME": str(cache), "APPPOT_DEBIAN_MIRROR": "http://127.0.0.1:9/debian"}
    r = subprocess.run(
        [APPPOT, "start", "-v", "--backend", "auto", "--image", str(tiny_image), "--", "echo", "ran"],
        cwd=job,
        env=offline,
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert (r.returncode, r.stdout) == (0, b"ran\n"), r.stderr
    assert b"uml, because KVM does not work (not probed: no guest kernel to probe with (cannot look up" in r.stderr
    assert not list((cache / "apppot" / "host").glob("kvm-probe-*"))
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "APPPOT_KVM": "0"}
    r = subprocess.run(
        [APPPOT, "start", "--backend", "qemu", "--image", str(tiny_image), "--", "uname", "-r"],
        cwd=job,
        env=env,
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    record = json.loads(next((cache / "apppot" / "guest-kernel").glob("*/kernel.json")).read_text())
    assert f"fetching Debian's kernel package {record['package']} {record['version']}".encode() in r.stderr
    assert r.stdout.decode().strip() == record["release"]  # the guest runs Debian's kernel, not the host's
    assert record["package"].startswith("linux-image-") and "virtio_blk" in record["direct"]


def test_compressed_modules_of_a_kernel_package_are_kept_uncompressed(
    cache_home: Path, guest_kernel_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Newer Debian kernels ship modules as .ko.xz or .ko.zst: a package laid out so (made of the fetched
    kernel's real modules) gives the same modules, uncompressed for busybox's insmod."""
    from apppot import guest_kernel

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    kernel = guest_kernel.installed()
    assert kernel is not None
    moddir = tmp_path / "pkg" / "lib" / "modules" / kernel.release
    (moddir / "kernel" / "drivers").mkdir(parents=True)
    (tmp_path / "pkg" / "boot").mkdir()
    (tmp_path / "pkg" / "boot" / f"vmlinuz-{kernel.release}").write_bytes(kernel.vmlinuz.read_bytes())
    builtin = set()
    for i, name in enumerate(kernel.load_order):
        data = kernel.module(name).read_bytes()
        builtin |= set(guest_kernel.module_depends(data)) - set(kernel.load_order)
        plain = moddir / "kernel" / "drivers" / f"{name}.ko"
        plain.write_bytes(data)
        compress = {1: ["xz", "-q"], 2: ["zstd", "-q", "--rm"]}.get(i % 3)  # a third of each kind
        if compress:
            subprocess.run([*compress, str(plain)], check=True)
    (moddir / "modules.builtin").write_text("".join(f"kernel/x/{name}.ko\n" for name in sorted(builtin)))
    kept = guest_kernel._keep(tmp_path / "pkg", tmp_path / "kept", kernel.package, kernel.version, kernel.release)
    assert kept.load_order == kernel.load_order and kept.direct == kernel.direct
    assert {p.suffix for p in (moddir / "kernel" / "drivers").iterdir()} == {".ko", ".xz", ".zst"}
    for name in kernel.load_order:
        assert kept.module(name).read_bytes() == kernel.module(name).read_bytes(), name


def test_the_base_is_never_written_and_a_dying_guest_is_reported(qemu, tiny_image: Path, tmp_path: Path) -> None:
    before = sha(tiny_image)
    job = tmp_path / "job"
    job.mkdir()
    r = qemu("start", "--user", "root", "--", "sh", "-c", "echo x > /etc/written; sync; echo c > /proc/sysrq-trigger", cwd=job)
    assert r.returncode == 122, r.err  # AppPot's code for a guest that ended without reporting
    assert "the guest ended without reporting the job's status (QEMU exited with status 0)" in r.err
    assert "Kernel panic" in r.err and "console log kept at" in r.err
    assert sha(tiny_image) == before
    r = qemu("start", "--", "sh", "-c", "test -e /etc/written || echo pristine", cwd=job)
    assert (r.returncode, r.stdout) == (0, b"pristine\n")


ESCAPES_9P = """
mkdir -p /mnt/job /mnt/ctl /mnt/other
mount -t 9p -o trans=virtio,version=9p2000.L apppot_job /mnt/job && ls -a /mnt/job/.. /mnt/job/../..
mount -t 9p -o trans=virtio,version=9p2000.L,aname=/ apppot_job /mnt/other && ls -a /mnt/other
mount -t 9p -o trans=virtio,version=9p2000.L,aname=.. apppot_job /mnt/other && ls -a /mnt/other
mount -t 9p -o trans=virtio hostroot /mnt/other && echo MOUNTED-HOSTROOT
ln -s /etc/../../../ /home/user/job/up 2>/dev/null; ls /home/user/job/up/
cat /home/user/job/../next-to-job.txt /mnt/job/../next-to-job.txt
mount -t 9p -o trans=virtio apppot_ctl /mnt/ctl && ls -a /mnt/ctl
true
"""


def test_guest_root_sees_only_the_job_directory_of_the_host(qemu, tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (tmp_path / "next-to-job.txt").write_text("HOST-SECRET-NEXT-TO-JOB")
    r = qemu("start", "--user", "root", "--", "sh", "-c", ESCAPES_9P, cwd=job)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, r.err
    assert "HOST-SECRET" not in out and "MOUNTED-HOSTROOT" not in out
    assert "next-to-job.txt" not in out
    assert tmp_path.name not in out  # the name the host gives the job directory's parent never shows
    # The link the job made points into the guest's own tree, never the host's.
    assert os.readlink(job / "up") == "/etc/../../../"


def test_a_debian_appliance_runs_under_qemu_with_its_changes_merged(
    cache_home: Path, guest_kernel_cache: Path, debian_dev: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPPOT_KVM", "0")
    archive = hand_made_archive(
        tmp_path / "changes.tar.gz", str(debian_dev["base_id"]), [("usr/local/bin/greet", b"#!/bin/sh\necho merged-$1\n")]
    )
    job = tmp_path / "job"
    job.mkdir()
    (job / "in.txt").write_text("3 4\n")
    script = "sh /usr/local/bin/greet qemu; awk '{print $1*$2}' in.txt > out.txt; cat /etc/debian_version >/dev/null; exit 6"
    r = apppot_cli(
        cache_home,
        "start",
        "--backend",
        "qemu",
        "--image",
        "debian-dev",
        "--changes",
        str(archive),
        "--",
        "sh",
        "-c",
        script,
        cwd=job,
    )
    assert (r.returncode, r.stdout) == (6, b"merged-qemu\n"), r.err
    assert (job / "out.txt").read_text() == "12\n"


def test_full_boot_under_qemu_runs_the_images_systemd_then_the_job(
    cache_home: Path,
    guest_kernel_cache: Path,
    debian_services: dict[str, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APPPOT_KVM", "0")
    job = tmp_path / "job"
    job.mkdir()
    r = apppot_cli(
        cache_home, "start", "--backend", "qemu", "--image", "debian-services", "--full-boot", "--", "sh", "-c",
        "cat /proc/1/comm; exit 7", cwd=job,
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (7, b"systemd\n"), r.err


def test_bad_input_under_qemu_gets_one_clear_line(qemu, tmp_path: Path, cache_home: Path, tiny_image: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PATH": str(empty)}
    r = subprocess.run([APPPOT, "start", "--", "true"], cwd=job, env=env, capture_output=True, check=False)
    assert r.returncode == 125
    assert r.stderr.decode() == ("apppot: error: qemu-system-x86_64 is not installed: sudo apt-get install qemu-system-x86\n")
    r = subprocess.run(
        [APPPOT, "image", "export", str(tiny_image), "-o", str(tmp_path / "x.qcow2")], env=env, capture_output=True, check=False
    )
    assert r.returncode == 125 and "qemu-img (qemu-utils)" in r.stderr.decode() and r.stderr.count(b"\n") == 1
    # A --cow that is no QEMU overlay, or one of another image.
    other = tmp_path / "other.cow"
    other.write_bytes(b"not a qcow2")
    r = qemu("start", "--cow", str(other), "--", "true", cwd=job)
    assert r.returncode == 125 and "is not a QEMU overlay" in r.err
    r = qemu("start", "--backend", "uml", "--kvm", "--", "true", cwd=job)
    assert r.returncode == 125 and "--kvm needs --backend qemu or auto" in r.err
    # An explicit --kernel (a UML kernel) under QEMU is an error; $APPPOT_KERNEL, set for every test
    # (the uml_kernel fixture), is a site's UML setting that QEMU jobs leave alone: this very job runs.
    assert os.environ.get("APPPOT_KERNEL")
    r = qemu("start", "--kernel", os.environ["APPPOT_KERNEL"], "--", "true", cwd=job)
    assert r.returncode == 125 and r.err.count("\n") == 1, r.err
    assert r.err.startswith("apppot: error: --kernel ") and "leave out --kernel, or add --backend uml" in r.err
    r = qemu("start", "--", "echo", "ran", cwd=job)
    assert (r.returncode, r.stdout) == (0, b"ran\n"), r.err


def test_qemus_own_stderr_goes_to_the_console_log_never_to_the_jobs(
    qemu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    wrapper = wrappers / "qemu-system-x86_64"  # QEMU that warns on its stderr, as it does about CPU features
    wrapper.write_text(f"#!/bin/sh\necho 'qemu-system-x86_64: warning: said by QEMU itself' >&2\nexec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrappers}:{os.environ['PATH']}")
    job = tmp_path / "job"
    job.mkdir()
    log = tmp_path / "console.log"
    r = qemu("start", "--console-log", str(log), "--", "sh", "-c", "echo job-err >&2", cwd=job)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"job-err\n")
    assert b"warning: said by QEMU itself" in log.read_bytes()


def test_a_kept_overlay_is_refused_while_in_use_and_against_another_or_changed_image(
    qemu, cache_home: Path, tiny_image: Path, tmp_path: Path
) -> None:
    from tests.integration.test_session import background

    job = tmp_path / "job"
    job.mkdir()
    mine = tmp_path / "mine.qcow2"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    with background(["start", "--cow", str(mine), "--", "sh", "-c", "touch started; sleep 100"], cwd=job, env=env) as bg:
        bg.wait_started()
        r = qemu("start", "--cow", str(mine), "--", "true", cwd=job)
        assert r.returncode == 125 and f"--cow {mine} is in use by another running job" in r.err, r.err
        # The check a refused job makes first takes no lock of its own: a shared lock held for a moment
        # made the running job's QEMU, as it took its write lock, fail with 122 (seen once in 10 starts).
        from apppot.backends.qemu_instance import check_overlay

        check_overlay(mine, tiny_image)
    copy = tmp_path / "copy.img"
    subprocess.run(["cp", "--sparse=always", "-p", str(tiny_image), str(copy)], check=True)
    r = qemu("start", "--image", str(copy), "--cow", str(mine), "--", "true", cwd=job)
    assert r.returncode == 125 and f"belongs to the image {tiny_image}, not {copy}" in r.err, r.err
    theirs = tmp_path / "theirs.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(copy), str(theirs)], check=True)
    later = theirs.stat().st_mtime_ns + 10**9
    os.utime(copy, ns=(later, later))  # the image changed after the overlay was last used
    r = qemu("start", "--image", str(copy), "--cow", str(theirs), "--", "true", cwd=job)
    assert r.returncode == 125 and "was made against" in r.err and "before the image changed" in r.err, r.err


def test_kvm_is_probed_by_booting_a_guest_and_auto_follows_the_probe(
    cache_home: Path, guest_kernel_cache: Path, tmp_path: Path
) -> None:
    job = tmp_path / "job"
    job.mkdir()
    r = apppot_cli(cache_home, "doctor", "--json", cwd=job)
    assert r.returncode == 0, r.err
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    kvm = checks["kvm"]
    assert kvm["detail"]  # says why, either way
    r = apppot_cli(cache_home, "start", "-v", "--backend", "auto", "--", "cat", "/proc/version", cwd=job)
    assert r.returncode == 0, r.err
    if kvm["ok"]:
        assert "KVM works" in r.err and b"Debian" in r.stdout
    else:
        assert "uml, because KVM does not work" in r.err
        r = apppot_cli(cache_home, "start", "--backend", "qemu", "--kvm", "--", "true", cwd=job)
        assert r.returncode == 125 and f"KVM does not work on this host: {kvm['detail']}" in r.err
        # Without --kvm, QEMU emulates, and says it is slow (once per cache; -v: every time).
        r = apppot_cli(cache_home, "start", "-v", "--backend", "qemu", "--", "echo", "emulated", cwd=job)
        assert (r.returncode, r.stdout) == (0, b"emulated\n") and "several times slower" in r.err
    assert "backend auto" in checks and checks["guest kernel"]["detail"].startswith("linux-image-")


# --- exported images and cloud seeds ----------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, cache_home: Path, guest_kernel_cache: Path, tiny_image: Path) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny.qcow2"
    r = apppot_cli(cache_home, "image", "export", str(tiny_image), "-o", str(out), "--json", cwd=out.parent)
    assert r.returncode == 0, r.err
    assert json.loads(r.stdout)["format"] == "qcow2"
    return out


def firmware_boot(
    disk: Path,
    tmp_path: Path,
    seed: Path | None = None,
    disk_format: str = "qcow2",
    bus: DiskBus = DiskBus.VIRTIO,
    snapshot: bool = True,
) -> tuple[str, float]:
    """Boot disk by firmware alone, as another hypervisor would; (console text, seconds). The guest
    must power off by itself (or reboot: QEMU's -no-reboot ends it then)."""
    console = tmp_path / "console.log"
    argv = firmware_boot_argv(
        "qemu-system-x86_64",
        str(disk),
        Accel.TCG,
        512 << 20,
        str(console),
        str(seed) if seed else None,
        disk_format,
        bus=bus,
        snapshot=snapshot,
    )
    started = time.monotonic()
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=FIRMWARE_BOOT_TIMEOUT, check=True)
    return console.read_text(errors="replace"), time.monotonic() - started


def test_export_writes_every_format(cache_home: Path, guest_kernel_cache: Path, tiny_image: Path, tmp_path: Path) -> None:
    for fmt, name in (("vmdk", "a.vmdk"), ("vdi", "a.vdi"), ("raw", "a.img")):
        out = tmp_path / name
        r = apppot_cli(cache_home, "image", "export", "tiny", "-o", str(out), cwd=tmp_path)
        assert r.returncode == 0, r.err
        assert "[4/4]" in r.err  # progress
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True, check=True).stdout)
        assert info["format"] == fmt
    # Never over an existing file without --force; never in an unknown format.
    r = apppot_cli(cache_home, "image", "export", "tiny", "-o", str(tmp_path / "a.vdi"), cwd=tmp_path)
    assert r.returncode == 125 and "exists; choose another -o or pass --force" in r.err
    r = apppot_cli(cache_home, "image", "export", "tiny", "-o", str(tmp_path / "b"), "--format", "ova", cwd=tmp_path)
    assert r.returncode == 125 and "invalid choice: 'ova'" in r.err and r.err.count("\n") == 1
    r = apppot_cli(cache_home, "image", "export", "tiny", "-o", str(tmp_path / "b.iso"), cwd=tmp_path)
    assert r.returncode == 125 and "cannot tell the disk format from the name 'b.iso'" in r.err and r.err.count("\n") == 1
    # The other formats boot too, from the disks other hypervisors emulate: raw from IDE (Xen HVM), vdi
    # from SATA (VirtualBox); the agent comes up and, with no job anywhere, says so and powers off.
    for name, fmt, bus in (("a.img", "raw", DiskBus.IDE), ("a.vdi", "vdi", DiskBus.AHCI)):
        text, _ = firmware_boot(tmp_path / name, tmp_path, disk_format=fmt, bus=bus)
        assert "apppot-agent: no job found: no apppot_ctl on the kernel command line, no cidata volume" in text, text


def test_an_exported_image_boots_by_firmware_and_powers_off_without_a_job(exported: Path, tmp_path: Path) -> None:
    text, _ = firmware_boot(exported, tmp_path)
    assert "apppot-agent: no job found" in text
    assert "apppot-agent: job finished with status 125, powering off" in text


def test_a_cloud_seed_carries_the_job_to_an_exported_image(cache_home: Path, exported: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "data.txt").write_text("one\ntwo\nthree\n")
    (job / "run.sh").write_text(
        '#!/bin/sh\nprintf "<%s>" "$@"; echo; echo "lines=$(wc -l < data.txt)"; echo to-stderr >&2; exit 4\n'
    )
    (job / "run.sh").chmod(0o755)
    seed = tmp_path / "seed.iso"
    r = apppot_cli(cache_home, "cloud-seed", "--image", "tiny", "-o", str(seed), "--json", "--", "./run.sh", "a b", "$x", cwd=job)
    assert r.returncode == 0, r.err
    assert json.loads(r.stdout)["files"] == 2
    r = apppot_cli(cache_home, "cloud-seed", "-o", str(seed), "--", "true", cwd=job)
    assert r.returncode == 125 and "exists" in r.err
    text, _ = firmware_boot(exported, tmp_path, seed=seed)
    assert "apppot-boot: job source: NoCloud volume" in text
    # The console is shared with the kernel, whose messages may come between two writes of the job's.
    assert "<a b><$x>" in text and "lines=3" in text, text
    assert "to-stderr" in text
    assert "apppot-agent: job finished with status 4, powering off" in text


def seed_member(seed: Path, name: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"extracted-{name}"
    argv = ["xorriso", "-osirrox", "on", "-indev", str(seed), "-extract", f"/{name}", str(out)]
    subprocess.run(argv, capture_output=True, check=True)
    return out.read_bytes()


def test_a_cloud_seed_leaves_out_the_disks_and_seeds_of_the_job_directory(
    cache_home: Path, exported: Path, tmp_path: Path
) -> None:
    """Following the README in one directory (issue 16): the exported disks and the earlier seed stay out
    of the next seed, each named; the seed's size is printed."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (job / "run.sh").chmod(0o755)
    for name in ("app.qcow2", "app.img"):
        r = apppot_cli(cache_home, "image", "export", "tiny", "-o", name, cwd=job)
        assert r.returncode == 0, r.err
    for _ in range(2):  # the second time, the first seed is in the directory
        r = apppot_cli(cache_home, "cloud-seed", "-o", "seed.iso", "--force", "--", "./run.sh", cwd=job)
        assert r.returncode == 0, r.err
    lines = r.err.splitlines()
    assert lines[:2] == [
        f"apppot: left out of the seed: app.img (a raw disk image with an MBR, {human((job / 'app.img').stat().st_size)})",
        f"apppot: left out of the seed: app.qcow2 (a qcow2 disk image, {human((job / 'app.qcow2').stat().st_size)})",
    ], lines
    assert lines[2].startswith(f"apppot: wrote seed.iso, {human((job / 'seed.iso').stat().st_size)} (cidata: "), lines
    assert " 1 job files)" in lines[2] and len(lines) == 3
    assert (job / "seed.iso").stat().st_size < 1 << 20
    with tarfile.open(fileobj=io.BytesIO(seed_member(job / "seed.iso", "job.tar", tmp_path))) as t:
        assert t.getnames() == ["run.sh"]
    # An earlier seed under another name, as --json tells it.
    r = apppot_cli(cache_home, "cloud-seed", "-o", "next.iso", "--json", "--", "./run.sh", cwd=job)
    record = json.loads(r.stdout)
    assert [o["path"] for o in record["left_out"]] == ["app.img", "app.qcow2", "seed.iso"]
    assert record["left_out"][2]["what"] == "an ISO 9660 image such as a seed"
    assert record["bytes"] == (job / "next.iso").stat().st_size and record["files"] == 1


def test_a_cloud_job_keeps_its_files_and_a_crashed_one_is_not_rerun_at_every_boot(
    cache_home: Path, exported: Path, tmp_path: Path
) -> None:
    """On a VM's own disk (no snapshot): what a job writes is there at the next boot; a job whose boot
    crashed (panic=-1 reboots where a hypervisor restarts the VM) is not run again by the next boot."""
    disk = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(exported), str(disk)], check=True)

    def seed(name: str, script: str) -> Path:
        out = tmp_path / f"{name}.iso"
        r = apppot_cli(cache_home, "cloud-seed", "--no-jobdir", "--user", "root", "-o", str(out), "--", "sh", "-c", script)
        assert r.returncode == 0, r.err
        return out

    consoles = []

    def boot(seed: Path) -> str:
        text, _ = firmware_boot(disk, tmp_path, seed=seed, snapshot=False)
        consoles.append(text)
        return text

    text = boot(seed("write", "echo kept-on-disk > /root/kept"))
    assert "job finished with status 0, powering off" in text
    crash = seed("crash", "cat /root/kept; echo c > /proc/sysrq-trigger")
    text = boot(crash)
    assert "kept-on-disk" in text and "Kernel panic" in text
    # Another job on that disk runs (issue 16: the tiny appliance's busybox has no cksum, the key was
    # empty and every job was taken for the one that crashed) and clears the mark.
    text = boot(seed("other", "echo other-job-ran"))
    assert "other-job-ran" in text and "job finished with status 0, powering off" in text, text
    text = boot(crash)
    assert "kept-on-disk" in text and "Kernel panic" in text
    text = boot(crash)
    assert "this job's previous boot ended before the job did" in text and "status 125, powering off" in text
    assert "kept-on-disk" not in text
    assert not [line for text in consoles for line in text.splitlines() if "not found" in line]


def test_a_cloud_job_has_the_images_host_name_and_pseudo_terminals(cache_home: Path, exported: Path, tmp_path: Path) -> None:
    """Booted by firmware, as on a cloud (issue 15): the host name is the image's, devpts is mounted."""
    seed = tmp_path / "seed.iso"
    script = "echo name=$(hostname); echo pts=$(grep -c ' /dev/pts devpts ' /proc/mounts)"
    r = apppot_cli(cache_home, "cloud-seed", "--no-jobdir", "-o", str(seed), "--", "sh", "-c", script)
    assert r.returncode == 0, r.err
    text, _ = firmware_boot(exported, tmp_path, seed=seed)
    assert "name=apppot" in text and "pts=1" in text, text
    assert "apppot-agent: job finished with status 0, powering off" in text


def test_malformed_user_data_is_reported_by_the_agent_at_boot(exported: Path, tmp_path: Path) -> None:
    content = tmp_path / "seed"
    content.mkdir()
    (content / "user-data").write_text("#apppot-job\nA_V='3\nset -- 'true'\n")
    (content / "meta-data").write_text("instance-id: broken\n")
    seed = tmp_path / "broken.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-r", "-o", str(seed), str(content)], check=True)
    text, _ = firmware_boot(exported, tmp_path, seed=seed)
    assert "the user-data from the cidata volume" in text and "is malformed:" in text
    assert "job finished with status 125, powering off" in text


# --- sessions: a terminal, signals, a guest that stops running --------------------------------------


def test_interactive_shell_under_qemu(qemu, cache_home: Path, tmp_path: Path) -> None:
    from tests.integration.test_session import COLS, GUEST_TERM, ROWS, pane_command, read_exit, tmux_session, wait_for

    job = tmp_path / "job"
    job.mkdir()
    exit_file = tmp_path / "exit-status"
    name = f"apppot-test-{os.getpid()}-tty"
    env = {
        "XDG_CACHE_HOME": str(cache_home),
        "TERM": GUEST_TERM,
        "APPPOT_BACKEND": "qemu",
        "APPPOT_KVM": "0",
    }
    with tmux_session(
        tmp_path / "tmux.sock", job, pane_command(["start", "--id", name, "--", "/bin/sh"], env, exit_file), name
    ) as tmux:
        tmux.wait_prompt()
        tmux.type("echo $((6*7))")
        tmux.wait_line("42")
        tmux.type("stty size; tty")
        tmux.wait_line(f"{ROWS} {COLS}")
        tmux.wait_line("/dev/ttyS3")
        tmux.type("sleep 100")
        time.sleep(2.0)
        tmux.key("C-c")  # to the guest's shell, not to apppot
        tmux.type("echo after-ctrl-c")
        tmux.wait_line("after-ctrl-c", timeout=15)
        tmux.type("exit 5")
        wait_for(lambda: read_exit(exit_file), 30, lambda: f"apppot to end; {tmux.dump()}")
    assert read_exit(exit_file) == "EXIT=5"


def test_keys_typed_while_qemu_boots_reach_the_shell_whole(qemu, cache_home: Path, tmp_path: Path) -> None:
    """Typed before the prompt (QEMU starting, the guest booting): held by the host until the agent holds
    the guest's serial terminal open, then delivered; neither echoed by the host's terminal nor lost."""
    from tests.integration.test_session import GUEST_TERM, pane_command, read_exit, tmux_session, wait_for

    job = tmp_path / "job"
    job.mkdir()
    exit_file = tmp_path / "exit-status"
    name = f"apppot-test-{os.getpid()}-early"
    env = {"XDG_CACHE_HOME": str(cache_home), "TERM": GUEST_TERM, "APPPOT_BACKEND": "qemu", "APPPOT_KVM": "0"}
    with tmux_session(
        tmp_path / "tmux.sock", job, pane_command(["start", "--id", name, "--", "/bin/sh"], env, exit_file), name
    ) as tmux:
        time.sleep(0.3)  # apppot has started, QEMU not yet
        tmux.type("echo typed-early-$((6*7))")
        time.sleep(1.5)  # QEMU runs, the guest kernel boots
        tmux.type("echo typed-during-boot-$((6*8))")
        tmux.wait_line("typed-early-42", timeout=60)
        tmux.wait_line("typed-during-boot-48", timeout=15)
        tmux.type("sleep 100")  # released, the keys are the job's: Ctrl-C interrupts the guest's command
        time.sleep(0.5)
        tmux.key("C-c")
        tmux.type("echo interrupted-$((2+3))")
        tmux.wait_line("interrupted-5", timeout=15)
        tmux.type("exit 4")
        wait_for(lambda: read_exit(exit_file), 30, lambda: f"apppot to end; {tmux.dump()}")
    assert read_exit(exit_file) == "EXIT=4"


def test_ctrl_c_while_qemu_boots_ends_apppot_and_is_not_replayed_into_the_job(qemu, cache_home: Path, tmp_path: Path) -> None:
    """Until the guest can take keys the terminal's Ctrl-C is a signal to AppPot (130, guest stopped and
    cleaned up by tmux_session's check), not a byte held back and typed into the job once it runs."""
    from tests.integration.test_session import GUEST_TERM, pane_command, read_exit, tmux_session, wait_for

    job = tmp_path / "job"
    job.mkdir()
    exit_file = tmp_path / "exit-status"
    name = f"apppot-test-{os.getpid()}-ctrlc"
    env = {"XDG_CACHE_HOME": str(cache_home), "TERM": GUEST_TERM, "APPPOT_BACKEND": "qemu", "APPPOT_KVM": "0"}
    script = "echo job-started; sleep 5; echo job-finished-normally"
    # The pane stays after apppot has ended, for its screen to be read.
    command = pane_command(["start", "--id", name, "--", "sh", "-c", script], env, exit_file) + "; sleep 60"
    with tmux_session(tmp_path / "tmux.sock", job, command, name) as tmux:
        time.sleep(2)  # QEMU runs, the guest kernel boots (several seconds under TCG)
        assert not read_exit(exit_file), tmux.dump()
        tmux.key("C-c")
        wait_for(lambda: read_exit(exit_file), 30, lambda: f"apppot to end; {tmux.dump()}")
        screen = tmux.screen()
    assert read_exit(exit_file) == "EXIT=130", screen
    assert not any("job-started" in line for line in screen), screen


# The shell in the pane records its terminal's modes and whether its fd 0 is non-blocking (fdinfo's flags are
# octal; O_NONBLOCK is 04000), before apppot and after it ends.
TERMINAL_STATE = 'stty -g; sed -n "s/^flags:[[:space:]]*//p" /proc/$$/fdinfo/0'


@pytest.mark.parametrize("ending", ["apppot-SIGINT", "apppot-SIGTERM", "qemu-SIGKILL", "apppot-SIGKILL", "job-exit"])
def test_the_terminal_is_left_as_it_was_however_an_interactive_qemu_job_ends(
    qemu, ending: str, cache_home: Path, tmp_path: Path
) -> None:
    """The shell gets its terminal back as it left it: modes, and its open file blocking (QEMU makes its
    stdout non-blocking, which must not reach the shell's file). After SIGKILL of AppPot nothing of
    AppPot's runs to restore the modes: only the file's blocking is checked there."""
    from tests.integration.test_session import GUEST_TERM, descendants, pane_command, read_exit, tmux_session, wait_for

    job = tmp_path / "job"
    job.mkdir()
    exit_file = tmp_path / "exit-status"
    before, after = tmp_path / "before", tmp_path / "after"
    name = f"apppot-test-{os.getpid()}-tty-{ending}"
    env = {"XDG_CACHE_HOME": str(cache_home), "TERM": GUEST_TERM, "APPPOT_BACKEND": "qemu", "APPPOT_KVM": "0"}
    script = "touch started; sleep 100" if ending != "job-exit" else "touch started; sleep 3"
    run = pane_command(["start", "--id", name, "--", "sh", "-c", script], env, exit_file)
    command = f"({TERMINAL_STATE}) > {before}; {run}; ({TERMINAL_STATE}) > {after}; sleep 60"
    with tmux_session(tmp_path / "tmux.sock", job, command, name) as tmux:
        wait_for(lambda: (job / "started").exists(), 120, lambda: f"the job to start; {tmux.dump()}")
        pane = int(tmux.run("display-message", "-p", "-t", tmux.name, "#{pane_pid}"))
        tree = descendants(pane)
        apppot = [p for p in tree if "apppot start" in p.cmdline and name in p.cmdline and "env " not in p.cmdline]
        guest = [p for p in tree if "qemu-system" in p.argv0 and name in p.cmdline]
        assert apppot and guest, tree
        whom, _, signame = ending.partition("-")
        if whom != "job":
            target = apppot[0] if whom == "apppot" else guest[0]
            os.kill(target.pid, signal.Signals[signame])
        wait_for(lambda: after.exists() and after.read_text().count("\n") == 2, 60, lambda: f"the shell back; {tmux.dump()}")
    modes_before, flags_before = before.read_text().split()
    modes_after, flags_after = after.read_text().split()
    assert int(flags_after, 8) & os.O_NONBLOCK == 0, (flags_before, flags_after)
    if ending != "apppot-SIGKILL":
        assert modes_after == modes_before
    assert read_exit(exit_file)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_stops_qemu_and_leaves_nothing_behind(qemu, signum: int, cache_home: Path, tmp_path: Path) -> None:
    """SIGTERM: AppPot stops QEMU and cleans up. SIGKILL: AppPot cannot, but QEMU gets the parent-death
    signal AppPot asked for and ends too."""
    from tests.integration.test_session import assert_all_gone, background, descendants

    job = tmp_path / "job"
    job.mkdir()
    run_tmp = tmp_path / "run-tmp"
    run_tmp.mkdir()
    name = f"apppot-test-{os.getpid()}-sig{signum}"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "TMPDIR": str(run_tmp)}
    with background(["start", "--id", name, "--", "sh", "-c", "touch started; sleep 100"], cwd=job, env=env) as bg:
        bg.wait_started()
        tree = descendants(bg.proc.pid)
        assert any("qemu-system" in p.argv0 and name in p.cmdline for p in tree), tree
        bg.proc.send_signal(signum)
        rc, took = bg.wait(timeout=15)
    if signum == signal.SIGKILL:
        assert rc == -signal.SIGKILL
        assert_all_gone(tree, [name], settle=10)
        return
    assert rc == 128 + signal.SIGTERM and took < 15, bg.stderr()
    assert list(run_tmp.iterdir()) == []
    assert_all_gone(tree, [name, str(run_tmp)])


def test_a_guest_that_stops_running_is_ended_by_the_watchdog(qemu, tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    started = time.monotonic()
    # The job freezes the boot stage's watchdog feeder, as a hung guest would stop feeding it.
    freeze = "kill -STOP $(pidof watchdog) && touch frozen && sleep 600"
    r = qemu("start", "--user", "root", "--extra", "apppot_watchdog=8", "--", "sh", "-c", freeze, cwd=job, timeout=200)
    assert (job / "frozen").exists()
    assert r.returncode == 122 and "QEMU exited" in r.err, r.err
    assert time.monotonic() - started < 120


def test_user_data_from_a_metadata_service(exported: Path, tmp_path: Path) -> None:
    """No cidata volume: the boot stage asks 169.254.169.254 over HTTP. QEMU's user network forwards
    each connection to that address to a command, here one that answers with the user-data."""
    from apppot.protocol import GuestJob, render_user_data

    user_data = render_user_data(GuestJob(argv=("sh", "-c", "echo from-metadata; exit 9")))
    response = tmp_path / "response.http"
    response.write_bytes(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(user_data) + user_data)
    netdev = f"user,id=net0,net=169.254.169.0/24,host=169.254.169.2,guestfwd=tcp:169.254.169.254:80-cmd:cat {response}"
    console = tmp_path / "console.log"
    argv = firmware_boot_argv("qemu-system-x86_64", str(exported), Accel.TCG, 512 << 20, str(console), netdev=netdev)
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=FIRMWARE_BOOT_TIMEOUT, check=True)
    text = console.read_text(errors="replace")
    assert "apppot-boot: job source: metadata service" in text
    assert "from-metadata" in text and "job finished with status 9, powering off" in text

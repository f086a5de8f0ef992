"""Pure parts of the QEMU backend, image export, cloud seeds and the backend choice."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from importlib import resources
from pathlib import Path

import pytest

from apppot.backends.choice import Backend, KvmState, decide, requested
from apppot.backends.qemu import Accel, DiskBus, QemuLaunch, firmware_boot_argv, qemu_argv
from apppot.errors import HostError, UsageError
from apppot.guest_kernel import CpioEntry, cpio_newc, load_order, module_name, parse_depends, vmlinux_from_bzimage
from apppot.images.export import DiskFormat, layout, sfdisk_script, syslinux_cfg
from apppot.protocol import PROTOCOL_VERSION, USER_DATA_MAGIC, GuestJob, StdinMode, render_kernel_params, render_user_data
from apppot.submit.cloud import job_tar, meta_data

AGENT = resources.files("apppot.guest").joinpath("apppot-init")
SHELLS = [s for s in ("/bin/busybox", "/bin/dash") if shutil.which(s)]

BASE = QemuLaunch(
    qemu="/usr/bin/qemu-system-x86_64",
    kernel="/k/vmlinux",
    initrd="/k/initrd.cpio",
    image="/img/tiny.img",
    accel=Accel.TCG,
    mem_bytes=512 << 20,
    ctl_dir="/run/ctl",
    out_dir="/run/out",
    job_dir="/home/me/job",
    log_fd=3,
    stdout_fd=5,
    stderr_fd=7,
)
PARAMS = render_kernel_params("apppot_ctl", "apppot_out", "apppot_job", ninep=True)
MACHINE = [
    "/usr/bin/qemu-system-x86_64",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-machine",
    "pc,accel=tcg",
    "-cpu",
    "max",
    "-smp",
    "1",
    "-m",
    "512M",
    "-no-reboot",
    "-device",
    "i6300esb",
    "-action",
    "watchdog=poweroff",
]
SHARES = [
    "-fsdev",
    "local,id=apppot_ctl,path=/run/ctl,security_model=none,readonly=on",
    "-device",
    "virtio-9p-pci,fsdev=apppot_ctl,mount_tag=apppot_ctl",
    "-fsdev",
    "local,id=apppot_out,path=/run/out,security_model=none",
    "-device",
    "virtio-9p-pci,fsdev=apppot_out,mount_tag=apppot_out",
    "-fsdev",
    "local,id=apppot_job,path=/home/me/job,security_model=none",
    "-device",
    "virtio-9p-pci,fsdev=apppot_job,mount_tag=apppot_job",
]
APPEND = (
    "console=ttyS2 quiet panic=-1 apppot_root=/dev/vda apppot_modules=direct "
    "apppot_ctl=apppot_ctl apppot_out=apppot_out apppot_job=apppot_job apppot_fs=9p"
)


def test_golden_argv_of_a_batch_job() -> None:
    assert qemu_argv(BASE, PARAMS) == [
        *MACHINE,
        "-drive",
        "file=/img/tiny.img,format=raw,if=virtio,snapshot=on,cache=unsafe,werror=report,rerror=report",
        *SHARES,
        *["-serial", "null", "-serial", "null"],
        *["-chardev", "file,id=log,path=/dev/fd/3,append=on", "-serial", "chardev:log"],
        "-device",
        "virtio-serial-pci",
        *["-chardev", "file,id=out,path=/dev/fd/5", "-device", "virtserialport,chardev=out,name=apppot.stdout"],
        *["-chardev", "file,id=err,path=/dev/fd/7", "-device", "virtserialport,chardev=err,name=apppot.stderr"],
        *["-kernel", "/k/vmlinux", "-initrd", "/k/initrd.cpio", "-append", APPEND],
    ]


def test_golden_argv_of_an_interactive_kvm_job_with_network_and_overlay() -> None:
    launch = BASE._replace(
        accel=Accel.KVM,
        terminal=True,
        name="job-7",
        overlay="/home/me/mine.qcow2",
        netdev="vde,id=net0,sock=/run/j/net",
        stdout_port=False,
        stderr_port=False,
        extra=("loglevel=3",),
        full_boot=True,
    )
    argv = qemu_argv(launch, [*PARAMS, "apppot_changes=1"])
    assert argv[argv.index("-machine") + 1] == "pc,accel=kvm"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-drive") + 1] == "file=/home/me/mine.qcow2,format=qcow2,if=virtio,werror=report,rerror=report"
    serials = [argv[i + 1] for i, a in enumerate(argv) if a == "-serial"]
    assert serials == ["chardev:out", "chardev:err", "chardev:log", "chardev:term"]  # ttyS0..ttyS3
    assert "stdio,id=term,signal=off" in argv
    assert argv[argv.index("-name") + 1] == "job-7"
    assert "virtio-serial-pci" not in argv
    assert argv[argv.index("-netdev") + 1] == "vde,id=net0,sock=/run/j/net"
    assert argv[-1] == (
        "console=ttyS2 quiet panic=-1 apppot_root=/dev/vda apppot_modules=direct "
        "apppot_init=/usr/lib/systemd/systemd apppot_tty=ttyS3 loglevel=3 "
        "apppot_ctl=apppot_ctl apppot_out=apppot_out apppot_job=apppot_job apppot_fs=9p apppot_changes=1"
    )


def test_writable_image_has_no_snapshot() -> None:
    argv = qemu_argv(BASE._replace(writable=True), PARAMS)
    assert argv[argv.index("-drive") + 1] == "file=/img/tiny.img,format=raw,if=virtio,werror=report,rerror=report"


def test_firmware_boot_passes_no_kernel_and_no_command_line() -> None:
    argv = firmware_boot_argv("qemu", "app.qcow2", Accel.TCG, 256 << 20, "/tmp/console.log", seed="seed.iso")
    assert "-kernel" not in argv and "-append" not in argv and "-initrd" not in argv
    assert "file=seed.iso,format=raw,media=cdrom,readonly=on" in argv
    assert "file=app.qcow2,format=qcow2,snapshot=on,if=virtio" in argv
    ide = firmware_boot_argv("qemu", "a.img", Accel.TCG, 256 << 20, "c.log", disk_format="raw", bus=DiskBus.IDE)
    assert "file=a.img,format=raw,snapshot=on,if=ide" in ide
    sata = firmware_boot_argv("qemu", "a.vdi", Accel.TCG, 256 << 20, "c.log", disk_format="vdi", bus=DiskBus.AHCI)
    disk = sata.index("file=a.vdi,format=vdi,snapshot=on,if=none,id=disk0")
    assert sata[disk - 3 : disk + 3] == [
        "-device",
        "ahci,id=sata",
        "-drive",
        sata[disk],
        "-device",
        "ide-hd,drive=disk0,bus=sata.0",
    ]


def test_ninep_tags_are_checked() -> None:
    assert render_kernel_params("apppot_ctl", "apppot_out", "apppot_job", changes=True, ninep=True) == [
        "apppot_ctl=apppot_ctl",
        "apppot_out=apppot_out",
        "apppot_job=apppot_job",
        "apppot_fs=9p",
        "apppot_changes=1",
    ]
    with pytest.raises(UsageError):
        render_kernel_params("/a/path", "apppot_out", "apppot_job", ninep=True)


# --- backend choice ---------------------------------------------------------------------------------


def test_backend_request_order_is_flag_env_config_default() -> None:
    env = {"APPPOT_BACKEND": "qemu"}

    def config() -> dict[str, str]:
        return {"backend": "auto"}

    def unread() -> dict[str, str]:
        raise AssertionError("the config file was read although the flag or the environment decided")

    assert requested("uml", env, unread) == (Backend.UML, "--backend")
    assert requested(None, env, unread) == (Backend.QEMU, "$APPPOT_BACKEND")
    assert requested(None, {}, config) == (Backend.AUTO, "config")
    assert requested(None, {}, dict) == (Backend.UML, "default")
    with pytest.raises(UsageError, match="unknown backend 'xen' from config"):
        requested(None, {}, lambda: {"backend": "xen"})


WORKS = KvmState(True, "booted")
BROKEN = KvmState(False, "no guest booted")


def never() -> KvmState:
    raise AssertionError("the KVM probe ran where it was not needed")


def test_auto_is_kvm_where_a_guest_boots_else_uml() -> None:
    assert decide(Backend.AUTO, "x", None, lambda: WORKS)[:2] == (Backend.QEMU, Accel.KVM)
    fallback = decide(Backend.AUTO, "x", None, lambda: BROKEN)
    assert fallback[:2] == (Backend.UML, None) and "no guest booted" in fallback.why and fallback.warning is None
    assert decide(Backend.AUTO, "x", False, never)[:2] == (Backend.UML, None)


def test_qemu_without_kvm_warns_and_emulates_and_kvm_flag_fails_clearly() -> None:
    tcg = decide(Backend.QEMU, "x", None, lambda: BROKEN)
    assert tcg[:2] == (Backend.QEMU, Accel.TCG) and tcg.warning and "slower" in tcg.warning
    assert decide(Backend.QEMU, "x", None, lambda: WORKS)[:2] == (Backend.QEMU, Accel.KVM)
    # --no-kvm asks for emulation explicitly: no probe, no warning.
    assert decide(Backend.QEMU, "x", False, never)[:2] == (Backend.QEMU, Accel.TCG)
    assert decide(Backend.QEMU, "x", False, never).warning is None
    with pytest.raises(HostError, match="KVM does not work on this host: no guest booted"):
        decide(Backend.QEMU, "x", True, lambda: BROKEN)
    assert decide(Backend.UML, "x", None, never)[:2] == (Backend.UML, None)
    with pytest.raises(UsageError):
        decide(Backend.UML, "x", True, never)


def test_an_explicit_uml_kernel_is_refused_where_qemu_runs_the_job() -> None:
    """--kernel names a UML kernel: under QEMU it would be ignored, so it is an error naming the fix; before
    any probe where QEMU was asked for. ($APPPOT_KERNEL is never passed here: a site's UML setting.)"""
    for kvm in (None, True, False):
        with pytest.raises(UsageError) as refused:
            decide(Backend.QEMU, "--backend", kvm, never, uml_kernel="/k/linux")
        assert str(refused.value) == (
            "--kernel /k/linux names a UML kernel, but --backend qemu runs the job with Debian's guest kernel; "
            "leave out --kernel, or use --backend uml instead of qemu"
        )
    # Asked for elsewhere, --backend uml on the command line is the fix that wins.
    with pytest.raises(UsageError) as refused:
        decide(Backend.QEMU, "$APPPOT_BACKEND", None, never, uml_kernel="/k/linux")
    assert str(refused.value) == (
        "--kernel /k/linux names a UML kernel, but qemu from $APPPOT_BACKEND runs the job with Debian's guest kernel; "
        "leave out --kernel, or add --backend uml"
    )
    assert decide(Backend.UML, "x", None, never, uml_kernel="/k/linux")[:2] == (Backend.UML, None)


def test_auto_with_an_explicit_uml_kernel_is_uml_on_every_host() -> None:
    """The same command runs the same way on a host with KVM and one without: the kernel decides, unprobed."""
    for kvm in (None, False):
        chosen = decide(Backend.AUTO, "--backend", kvm, never, uml_kernel="/k/linux")
        assert chosen[:2] == (Backend.UML, None) and chosen.warning is None
        assert chosen.why == "auto (--backend): uml, because --kernel names a UML kernel"
    with pytest.raises(UsageError) as refused:
        decide(Backend.AUTO, "--backend", True, never, uml_kernel="/k/linux")
    assert str(refused.value) == ("--kernel /k/linux names a UML kernel, but --kvm asks for QEMU with KVM; leave out one of them")


# --- the guest kernel -------------------------------------------------------------------------------


def test_modules_load_after_their_dependencies_and_builtins_are_left_out() -> None:
    depends = {"ext4": ["jbd2", "mbcache", "crc16"], "jbd2": [], "mbcache": [], "crc16": [], "9p": ["9pnet", "netfs"]}
    depends |= {"9pnet": [], "netfs": []}
    assert load_order(["9p", "ext4"], depends, {"crc16"}) == ["9pnet", "netfs", "9p", "jbd2", "mbcache", "ext4"]
    with pytest.raises(HostError, match="no module vfat"):
        load_order(["vfat"], depends, set())
    assert module_name("xen-blkfront.ko") == "xen_blkfront"


def test_the_real_kernel_package_is_read_from_apt_cache_depends() -> None:
    text = "linux-image-amd64\n  Depends: linux-image-6.1.0-50-amd64\n  Recommends: firmware-linux-free\n"
    assert parse_depends(text) == "linux-image-6.1.0-50-amd64"
    assert parse_depends("linux-image-amd64\n") is None


def test_cpio_archive_is_read_back_by_busybox(tmp_path: Path) -> None:
    if not shutil.which("busybox"):
        pytest.skip("busybox is not installed")
    data = cpio_newc(
        [CpioEntry("dir", 0o040755), CpioEntry("dir/file", 0o100644, b"odd length"), CpioEntry("l", 0o120777, b"dir")]
    )
    listing = subprocess.run(["busybox", "cpio", "-t"], input=data, capture_output=True, check=True).stdout.split()
    assert listing == [b"dir", b"dir/file", b"l"]
    subprocess.run(["busybox", "cpio", "-i", "-d"], input=data, cwd=tmp_path, capture_output=True, check=True)
    assert (tmp_path / "dir/file").read_bytes() == b"odd length" and os.readlink(tmp_path / "l") == "dir"


def test_vmlinux_is_found_only_in_xz_payloads() -> None:
    import lzma

    elf = b"\x7fELF" + bytes(100)
    assert vmlinux_from_bzimage(b"setup code" + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"trailer") == elf
    assert vmlinux_from_bzimage(b"no payload here") is None


# --- export and cloud seeds -------------------------------------------------------------------------


def test_disk_layout_and_partition_table() -> None:
    lay = layout(64 * 1024 * 1024 + 512)
    assert (lay.boot_start, lay.root_start, lay.root_size) == (1 << 20, 65 << 20, 65 << 20)
    assert sfdisk_script(lay) == ("label: dos\nstart=2048, size=131072, type=6, bootable\nstart=133120, size=133120, type=83\n")
    cfg = syslinux_cfg("0123-abcd")
    assert "apppot_root=UUID=0123-abcd" in cfg and "console=ttyS0" in cfg and "LINUX /vmlinuz" in cfg


def test_disk_formats() -> None:
    assert DiskFormat.from_name("VMDK") is DiskFormat.VMDK
    assert DiskFormat.from_suffix(Path("a.vdi")) is DiskFormat.VDI
    assert DiskFormat.from_suffix(Path("a.img")) is DiskFormat.RAW
    assert DiskFormat.from_suffix(Path("a.iso")) is None
    with pytest.raises(UsageError, match="unknown disk format 'ova'"):
        DiskFormat.from_name("ova")


def test_seed_meta_data_and_job_tar(tmp_path: Path) -> None:
    assert meta_data("apppot-1") == b"instance-id: apppot-1\nlocal-hostname: apppot\n"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a")
    (tmp_path / "link").symlink_to("sub/a.txt")
    (tmp_path / "seed.iso").write_text("the output itself")
    out = io.BytesIO()
    packed = job_tar(tmp_path, out, {(tmp_path / "seed.iso").resolve()})
    assert packed == (2, [])
    out.seek(0)
    with tarfile.open(fileobj=out) as t:
        assert sorted(t.getnames()) == ["link", "sub", "sub/a.txt"]
        assert all(m.uid == 0 for m in t.getmembers())
        assert t.extractfile("sub/a.txt").read() == b"a"  # type: ignore[union-attr]
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match="neither a file"):
        job_tar(tmp_path, io.BytesIO(), set())


# --- user-data: the host's renderer and the agent's parser ------------------------------------------

PARSE = """
. "$AGENT"
log() { :; }
apppot_fail() { printf 'FAIL: %s\\n' "$*"; exit 125; }
parse() {
    set -f
    apppot_check_user_data "$1" "the test"
    . "$JOBFILE"
    printf '%s\\0' "$A_V" "$A_UID" "$A_USER" "$A_STDIN" "$A_TTY" "$A_ARGV" "$@"
}
parse "$USER_DATA"
"""


def agent_parse(shell: str, user_data: bytes, tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    path = tmp_path / "user-data"
    path.write_bytes(user_data)
    argv = [shell, "sh"] if shell.endswith("busybox") else [shell]
    env = {"PATH": "/usr/bin:/bin", "AGENT": str(AGENT), "APPPOT_AGENT_LIBRARY": "1", "USER_DATA": str(path)}
    return subprocess.run([*argv, "-c", PARSE], env=env, capture_output=True, check=False)


@pytest.mark.parametrize("shell", SHELLS)
def test_user_data_round_trips_through_the_agents_parser(shell: str, tmp_path: Path) -> None:
    argv = ("./run.sh", "two words", "$HOME `id`", "new\nline", "ütf-8 ✓", "", "a'b")
    job = GuestJob(argv=argv, uid=1000, gid=1000, user="alice", stdin=StdinMode.SPOOL, interactive=True, term="xterm")
    data = render_user_data(job)
    assert data.startswith(USER_DATA_MAGIC)
    r = agent_parse(shell, data, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    values = r.stdout.split(b"\0")[:-1]
    # In a cloud there is no host stdin or terminal: the user-data never asks for them.
    assert values[:6] == [str(PROTOCOL_VERSION).encode(), b"1000", b"alice", b"null", b"0", b"1"]
    assert values[6:] == [a.encode() for a in argv]


@pytest.mark.parametrize(
    ("user_data", "message"),
    [
        (b"", "is empty"),
        (b"#cloud-config\npackages: [htop]\n", "not an AppPot job (it starts with '#cloud-config')"),
        (b"A_V='3'\n", "first line must be #apppot-job"),
        (b"#apppot-job\nA_V='3\nset -- 'x'\n", "is malformed"),
        (b"#apppot-job\nset -- true\n", "names no protocol version (A_V=): make it with apppot cloud-seed"),
    ],
)
def test_malformed_user_data_is_reported_by_the_agent(user_data: bytes, message: str, tmp_path: Path) -> None:
    r = agent_parse(SHELLS[0], user_data, tmp_path)
    assert r.returncode == 125 and message in r.stdout.decode(), r.stdout


def test_the_config_file_names_a_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apppot.backends.choice import config_path, read_config

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert read_config() == {}
    config_path().parent.mkdir(parents=True)
    config_path().write_text('backend = "qemu"\n')
    assert requested(None, {}) == (Backend.QEMU, "config")
    config_path().write_text("backend = qemu\n")
    with pytest.raises(UsageError, match=r"config\.toml is not valid TOML"):
        read_config()

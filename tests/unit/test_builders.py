"""Golden tests of the pure command-line builders: UML and bubblewrap."""

from __future__ import annotations

from apppot.backends.uml import UmlLaunch, cmdline_length, uml_argv
from apppot.sandbox import Bind, bwrap_argv

LAUNCH = UmlLaunch(
    kernel="/apppot/linux",
    base="/apppot/base/1234.img",
    cow="/apppot/cow",
    mem_bytes=256 * 1024 * 1024,
    umid="job-1",
    uml_dir="/apppot/uml",
    log_fd=3,
    stdout_fd=5,
    stderr_fd=7,
)


def test_uml_argv_for_a_batch_job() -> None:
    assert uml_argv(LAUNCH, ["apppot.v=1"]) == [
        "/apppot/linux",
        "ubd0=/apppot/cow,/apppot/base/1234.img",
        "root=/dev/ubda",
        "rw",
        "mem=256M",
        "init=/usr/sbin/apppot-init",
        "quiet",
        "umid=job-1",
        "uml_dir=/apppot/uml",
        "con=null",
        "ssl=null",
        "con0=null,fd:3",
        "ssl0=null,fd:5",
        "ssl1=null,fd:7",
        "apppot.v=1",
    ]


def test_uml_argv_with_terminal_network_and_extras() -> None:
    from dataclasses import replace

    launch = replace(LAUNCH, terminal_fds=(8, 9), slirp="/usr/bin/slirp-fullbolt", extra=("loglevel=7",))
    argv = uml_argv(launch, ["apppot.v=1"])
    assert argv[-4:] == [
        "con1=fd:8,fd:9",
        "eth0=slirp,fe:fd:0a:00:02:0f,/usr/bin/slirp-fullbolt",
        "loglevel=7",
        "apppot.v=1",
    ]


def test_cmdline_length_counts_what_uml_appends() -> None:
    assert cmdline_length(["/k", "a=1", "b"]) == len("a=1 b console=tty0")


def test_bwrap_argv_shows_only_the_binds() -> None:
    binds = [Bind("/usr/bin/linux.uml", "/apppot/linux"), Bind("/home/u/job", "/apppot/job", writable=True)]
    assert bwrap_argv("/usr/bin/bwrap", binds, share_net=False) == [
        "/usr/bin/bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--cap-drop",
        "ALL",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--clearenv",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/tmp",
        "--ro-bind",
        "/usr/bin/linux.uml",
        "/apppot/linux",
        "--bind",
        "/home/u/job",
        "/apppot/job",
        "--",
    ]


def test_bwrap_argv_shares_the_network_only_when_asked() -> None:
    assert "--share-net" in bwrap_argv("bwrap", [], share_net=True)
    assert "--share-net" not in bwrap_argv("bwrap", [], share_net=False)

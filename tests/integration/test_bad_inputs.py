"""Every bad input of `apppot start` and `apppot changes`: one line on stderr, a documented status
(125: AppPot could not run the job; 122: the guest misbehaved), no traceback, and no hang."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import ROOT, chown_to, open_to_all
from tests.integration.conftest import own_kernel_only

pytestmark = pytest.mark.uml
uml_kernel = own_kernel_only  # AppPot's UML kernel only

HANG_BOUND_S = 30.0


def _archive(tmp: Path, manifest: bytes) -> Path:
    path = tmp / "changes.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        member = tarfile.TarInfo(".apppot-changes.json")
        member.size = len(manifest)
        tar.addfile(member, io.BytesIO(manifest))
    return path


def _good_archive(tmp: Path) -> Path:
    info = {"format": "apppot-changes", "base": "0" * 64, "created": "", "tool": "t", "deleted": [], "added": [], "modified": []}
    return _archive(tmp, json.dumps(info).encode() + b" " * 200_000)  # compressible: a damaged middle is a zlib error


def _corrupt(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return path


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "fifo")
    return tmp / "fifo"


def _socket(tmp: Path) -> Path:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp / "sock"))
    s.close()
    return tmp / "sock"


def _directory(tmp: Path) -> Path:
    (tmp / "dir").mkdir()
    return tmp / "dir"


SPECIAL: dict[str, Callable[[Path], Path]] = {
    "fifo": _fifo,
    "socket": _socket,
    "chardev": lambda _tmp: Path("/dev/zero"),
    "directory": _directory,
}


def _special_args(option: str, make: Callable[[Path], Path]) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, _job: ["start", option, str(make(tmp)), "--", "true"]


class Case(NamedTuple):
    args: Callable[[Path, Path], list[str]]  # (tmp, jobdir) -> apppot's arguments
    status: int
    needle: str  # in the one line


CASES: dict[str, Case] = {
    **{
        f"{option}-{kind}": Case(_special_args(option, make), 125, "not a file")
        for option in ("--image", "--cow", "--changes", "--console-log")
        for kind, make in SPECIAL.items()
        if not (option == "--console-log" and kind == "chardev")  # /dev/null as console log is fine
    },
    "changes-corrupt-gzip": Case(
        lambda tmp, _job: ["start", "--changes", str(_corrupt(_good_archive(tmp))), "--", "true"], 125, "damaged"
    ),
    "changes-show-corrupt-gzip": Case(lambda tmp, _job: ["changes", "show", str(_corrupt(_good_archive(tmp)))], 125, "damaged"),
    "changes-in-jobdir-corrupt": Case(
        lambda tmp, job: ["start", "--", "true"] if _corrupt(_good_archive(tmp)).rename(job / "apppot-changes.tar.gz") else [],
        125,
        "remove or rename",
    ),
    "manifest-nested-200000": Case(
        lambda tmp, _job: ["changes", "show", str(_archive(tmp, b"[" * 200_000 + b"]" * 200_000))], 125, "malformed"
    ),
    "mem-99999G": Case(lambda _tmp, _job: ["start", "--mem", "99999G", "--", "true"], 125, "more than this host's memory"),
    "boot-timeout-bad": Case(lambda _tmp, _job: ["start", "--boot-timeout", "soon", "--", "true"], 125, "--boot-timeout"),
    "agent-never-starts": Case(
        lambda _tmp, _job: ["start", "--boot-timeout", "5", "--extra", "init=/bin/sh", "--", "true"], 122, "--boot-timeout"
    ),
    "tmpdir-missing": Case(lambda _tmp, _job: ["start", "--", "true"], 125, "/nonexistent"),
}
ENV = {"tmpdir-missing": {"TMPDIR": "/nonexistent/tmp"}}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line(apppot, jobdir: Path, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    started = time.monotonic()
    r = apppot(case.args(tmp_path, jobdir), cwd=jobdir, env=ENV.get(name), timeout=HANG_BOUND_S)
    took = time.monotonic() - started
    lines = r.err.splitlines()
    assert "Traceback" not in r.err
    assert (r.returncode, len(lines)) == (case.status, 1), r.err
    assert lines[0].startswith("apppot: error: ") and case.needle in lines[0], r.err
    assert "error::" not in lines[0]
    assert took < HANG_BOUND_S


MAIN = "import sys; from apppot.cli import main; sys.exit(main"  # completed by the arguments


@pytest.mark.parametrize("name", ["deleted-cwd", "unreadable-jobdir", "unwritable-tmpdir"])
def test_bad_places_as_a_plain_user(tmp_path: Path, test_user: str, tiny_image: Path, name: str) -> None:
    open_to_all(tmp_path)
    job = tmp_path / "job"
    job.mkdir()
    chown_to(job, test_user)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "APPPOT_IMAGE": str(tiny_image), "HOME": str(job), "TMPDIR": str(tmp_path)}
    python = sys.executable
    as_user = ["setpriv", f"--reuid={test_user}", f"--regid={test_user}", "--init-groups", "--"]
    reach = subprocess.run([*as_user, python, "-c", ""], check=False, capture_output=True)
    # The venv's interpreter may be out of the user's reach (under /root): the same sources, the system's python3.
    if reach.returncode != 0:
        python = "/usr/bin/python3"
        env["PYTHONPATH"] = str(ROOT / "src")
    cwd: Path | None = job
    if name == "deleted-cwd":
        gone = job / "gone"
        script = f"import os, sys; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); {MAIN}(['start', '--', 'true']))"
        gone.mkdir()
        chown_to(gone, test_user)
        argv = [python, "-c", script]
        needle = "current directory"
    elif name == "unreadable-jobdir":
        job.chmod(0o700)
        os.chown(job, 0, 0)
        argv = [
            python,
            "-c",
            "import sys; from apppot.cli import main; sys.exit(main())",
            "start",
            "--jobdir",
            str(job),
            "--",
            "true",
        ]
        cwd, needle = tmp_path, str(job)
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        env["TMPDIR"] = str(ro)
        argv = [python, "-c", f"{MAIN}())", "start", "--", "true"]
        needle = str(ro)
    full = [*as_user, *argv]
    r = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_BOUND_S, check=False)
    lines = r.stderr.splitlines()
    assert (r.returncode, len(lines)) == (125, 1), r.stderr
    assert needle in lines[0] and "error::" not in lines[0] and "Traceback" not in r.stderr

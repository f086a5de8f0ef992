"""Finding the User-mode Linux kernel, what it can do, and what it needs from the host.

Precedence: --kernel > $APPPOT_KERNEL > AppPot's own kernel (`apppot kernel build`) > the kernel published
in a site image directory (`apppot image publish`, apppot.images.sites) > Debian's `linux`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError
from apppot.hostcache import cached, file_identity, read_json, read_record, write_record
from apppot.images.store import cache_dir
from apppot.proc import run, which
from apppot.rundir import remove_tree

KERNEL_ENV = "APPPOT_KERNEL"
RECORD_NAME = "kernel.json"
CONFIG_LIMIT = 4 << 20  # a kernel .config is a few hundred KiB
MISSING_KERNEL = (
    "no User-mode Linux kernel found: build AppPot's own (apppot kernel build), install Debian's "
    "user-mode-linux package (sudo apt-get install user-mode-linux), or pass --kernel PATH"
)
CALIBRATION_TIMEOUT_S = 30.0
_LPJ = re.compile(rb"\(lpj=(\d+)\)")
_SECCOMP_FAILED = b"SECCOMP userspace requested but not functional"


class KernelSource(StrEnum):
    OPTION = "--kernel"
    ENV = KERNEL_ENV
    APPPOT = "apppot"  # built by `apppot kernel build`
    SITE = "site"  # published with the site's images (DIR/kernel/linux)
    DEBIAN = "debian"  # `linux` on PATH


class FoundKernel(NamedTuple):
    path: Path
    source: KernelSource


class KernelRecord(NamedTuple):
    """What `apppot kernel build` recorded next to the binary."""

    release: str  # upstream version, e.g. 7.3.4
    source_package: str
    source_version: str
    suite: str
    config_hash: str
    build_date: str
    seccomp: bool
    build_seconds: float

    @classmethod
    def read(cls, kernel: Path) -> KernelRecord | None:
        try:
            data = read_json(kernel.parent / RECORD_NAME)
            return cls(**{k: data[k] for k in cls._fields})
        except (KeyError, TypeError):
            return None

    def write(self, directory: Path) -> None:
        write_record(directory / RECORD_NAME, (json.dumps(self._asdict(), indent=2) + "\n").encode())


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def own_kernel() -> Path | None:
    """AppPot's own kernel: the one the newest `apppot kernel build` installed as default."""
    candidate = kernels_dir() / "default" / "linux"
    return candidate.resolve() if os.access(candidate, os.X_OK) else None


def find_kernel(explicit: str | None) -> FoundKernel:
    """The UML kernel to run, by the precedence in this module's docstring."""
    for source, value in ((KernelSource.OPTION, explicit), (KernelSource.ENV, os.environ.get(KERNEL_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file() or not os.access(path, os.X_OK):
                raise HostError(f"the UML kernel {value} given by {source} is not an executable file; fix the path")
            return FoundKernel(path.resolve(), source)
    own = own_kernel()
    if own is not None:
        return FoundKernel(own, KernelSource.APPPOT)
    from apppot.images.sites import site_kernel

    published = site_kernel()
    if published is not None:
        return FoundKernel(published, KernelSource.SITE)
    found = which("linux")
    if found is None:
        raise HostError(MISSING_KERNEL)
    return FoundKernel(Path(found).resolve(), KernelSource.DEBIAN)


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries (and loader) a dynamically linked binary needs, from ldd; cached per binary."""

    def compute() -> dict[str, list[str]]:
        result = run(["ldd", str(binary)], check=False)
        libs: list[str] = []
        for line in result.stdout.decode(errors="replace").splitlines():
            parts = line.split()
            if "=>" in parts:
                target = parts[parts.index("=>") + 1]
                if target.startswith("/"):
                    libs.append(target)
            elif parts and parts[0].startswith("/"):
                libs.append(parts[0])
        return {"libraries": libs}

    data = cached("ldd", [file_identity(binary)], compute)
    return [Path(p) for p in data["libraries"]]


class KernelTraits(NamedTuple):
    """What a kernel binary can do on this host, measured once and cached."""

    seccomp_option: bool  # the kernel knows seccomp= (UML 6.16 and newer)
    seccomp_works: bool  # and seccomp mode starts on this host
    eth_drivers: bool  # the old eth= drivers (slirp transport) are built in
    vector_driver: bool  # the vector driver (vecN:) is built in
    ip_autoconfig: bool  # ip= configures the network at boot (CONFIG_IP_PNP, known from AppPot's build record)
    lpj: int | None  # loops per jiffy, so boots skip the delay calibration

    def boot_params(self) -> list[str]:
        params = []
        if self.seccomp_works:
            params.append("seccomp=on")
        if self.lpj:
            params.append(f"lpj={self.lpj}")
        return params


def kernel_traits(kernel: Path, note: Callable[[str], None] | None = None) -> KernelTraits:
    """The kernel's traits on this host: its --help, and one calibration boot the first time."""

    def compute() -> dict[str, object]:
        if note:
            note(f"measuring {kernel} on this host once (seccomp mode, delay loop); cached")
        help_text = run([str(kernel), "--help"], check=False).stdout
        seccomp_option = b"seccomp=" in help_text
        # seccomp=on (not auto) stops the boot where seccomp does not work: then there is no lpj line.
        lpj = _calibrate(kernel, ["seccomp=on"]) if seccomp_option else None
        seccomp_works = lpj is not None
        if lpj is None:
            lpj = _calibrate(kernel, [])
        return {
            "seccomp_option": seccomp_option,
            "seccomp_works": seccomp_works,
            "eth_drivers": b"eth[0-9]+=" in help_text,
            "vector_driver": b"vec[0-9]+:" in help_text,
            "ip_autoconfig": "CONFIG_IP_PNP=y" in _build_config(kernel),
            "lpj": lpj,
        }

    # The field list is part of the key, so an older record is measured anew rather than misread.
    fields = ",".join(KernelTraits._fields)
    data = cached("kernel-traits", [fields, file_identity(kernel), *_host_identity()], compute)
    return KernelTraits(**data)  # type: ignore[arg-type]


def kernel_release(kernel: Path) -> str | None:
    """The release a UML kernel reports (`linux --version` prints it and exits), or None."""
    out = run([str(kernel), "--version"], check=False).stdout[:64].decode(errors="replace").strip()
    return out if re.fullmatch(r"\d+\.\d+[0-9A-Za-z.+~_-]*", out) else None


def _build_config(kernel: Path) -> str:
    """The .config AppPot's build kept next to the kernel, or '' for other kernels."""
    if KernelRecord.read(kernel) is None:
        return ""
    config = read_record(kernel.parent / "config", limit=CONFIG_LIMIT)
    return "" if config is None else config.decode(errors="replace")


def _calibrate(kernel: Path, params: list[str]) -> int | None:
    """Boot the kernel without a root disk until it prints its delay-loop calibration.

    Returns the lpj it printed, or None if it never got that far (e.g. seccomp refused)."""
    import tempfile

    uml_dir = tempfile.mkdtemp(prefix="apppot-calibrate-")
    argv = [str(kernel), "mem=32M", "loglevel=7", "con=null", "con0=null,fd:1", "ssl=null", f"uml_dir={uml_dir}", *params]
    with (
        contextlib.ExitStack() as cleanup,
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": os.environ.get("TMPDIR", "/tmp")},
        ) as proc,
    ):
        cleanup.callback(remove_tree, uml_dir)
        assert proc.stdout is not None
        output = b""
        deadline = time.monotonic() + CALIBRATION_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                output += chunk
                if _LPJ.search(output) or _SECCOMP_FAILED in output:
                    break
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    m = _LPJ.search(output)
    return int(m[1]) if m else None


def _host_identity() -> list[str]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return [os.uname().nodename, model, os.uname().release]

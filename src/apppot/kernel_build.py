"""`apppot kernel build`: AppPot's own UML kernel from Debian's kernel source packages.

Steps: look up the source packages through a private apt configuration (the system's
apt sources are never touched), choose one by the rule in kernel_source, download and
unpack it, configure (`defconfig`, then our fragment through the kernel's scripts/config,
then `olddefconfig`, then check), compile, install into the user's cache, and measure
the kernel on this host once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from apppot import kernel_config, kernel_source
from apppot.errors import AppPotError, HostError
from apppot.kernel import KernelRecord, kernel_traits, kernels_dir
from apppot.proc import run, which
from apppot.say import Say

BUILD_PACKAGES = "build-essential bc bison flex libelf-dev libssl-dev xz-utils"
BUILD_COMMANDS = ("gcc", "make", "bc", "bison", "flex", "xz", "tar", "dpkg-deb", "apt-get", "apt-cache")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "APPPOT_DEBIAN_MIRROR"  # a site's own Debian mirror
# Compiled files in a full build of our config (7.x); only used to show a percentage.
EXPECTED_FILES = 860
_KCONFIG_SYMBOL = re.compile(rb"^\s*(?:menu)?config\s+(\w+)", re.MULTILINE)


class KernelBuildError(AppPotError):
    """The kernel could not be built; AppPot keeps using the kernel it finds otherwise."""


@dataclass(frozen=True)
class Built:
    directory: Path
    record: KernelRecord
    reused: bool


def kernel_id(package: kernel_source.SourcePackage, config_hash: str) -> str:
    """The directory name of a kernel: upstream version, Debian revision and config hash."""
    version = re.sub(r"[^A-Za-z0-9.-]", "_", package.version)
    return f"{version}-{config_hash[:12]}"


def build(*, force: bool = False, jobs: int | None = None, say: Say) -> Built:
    """Build (or find already built) AppPot's kernel and make it the default."""
    root = kernels_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / ".build.lock", say):
        missing = [c for c in BUILD_COMMANDS if which(c) is None]
        if not Path("/usr/include/gelf.h").exists():
            missing.append("libelf headers")
        if missing:
            raise KernelBuildError(
                f"cannot build the kernel: missing {', '.join(missing)}; sudo apt-get install {BUILD_PACKAGES}"
            )
        apt = PrivateApt(root / "apt", own_suite=own_suite())
        say(f"looking up Debian's kernel sources ({', '.join(apt.suites)}) with a private apt configuration")
        fragment = kernel_config.fragment_text()
        config_hash = kernel_config.config_hash(fragment)
        try:
            choice = apt.choose()
        except KernelBuildError as e:
            # Offline, say: a kernel already built from this configuration is still good.
            kept = _newest_built(root, config_hash)
            if kept is None or force:
                raise
            say(f"{e}; keeping the kernel already built with this configuration: {kept[0]}")
            _make_default(root, kept[0])
            return Built(kept[0], kept[1], reused=True)
        package = choice.package
        if choice.fallback:
            say(
                f"no linux-source {kernel_source.SECCOMP_MIN[0]}.{kernel_source.SECCOMP_MIN[1]} or newer in "
                f"{', '.join(kernel_source.NEW_SUITES)}; building {package.name} from {package.suite} "
                "(no seccomp mode: jobs run slower)"
            )
        target = root / kernel_id(package, config_hash)
        record = KernelRecord.read(target / "linux")
        if record is not None and not force:
            say(f"{package.name} {package.version} with this config is already built: {target}")
            _make_default(root, target)
            return Built(target, record, reused=True)
        say(f"building {package.name} {package.version} from {package.suite}")
        work = root / f".build-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            started = time.monotonic()
            tarball = apt.download(package, work, say)
            tree = _unpack(tarball, work, say)
            _configure(tree, fragment, say)
            _compile(tree, jobs or os.cpu_count() or 1, say)
            record = KernelRecord(
                release=package.upstream,
                source_package=package.name,
                source_version=package.version,
                suite=package.suite,
                config_hash=config_hash,
                build_date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                seccomp=package.seccomp,
                build_seconds=round(time.monotonic() - started, 1),
            )
            _install(tree, target, record)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _make_default(root, target)
        traits = kernel_traits(target / "linux", say)
        mode = "seccomp" if traits.seccomp_works else "ptrace"
        say(f"installed {target / 'linux'} ({mode} mode on this host, lpj={traits.lpj})")
        return Built(target, record, reused=False)


def _newest_built(root: Path, config_hash: str) -> tuple[Path, KernelRecord] | None:
    """The most recently built kernel with this configuration, if any."""
    built = []
    for directory in root.glob(f"*-{config_hash[:12]}"):
        record = KernelRecord.read(directory / "linux")
        if record is not None and record.config_hash == config_hash:
            built.append((record.build_date, directory, record))
    if not built:
        return None
    _, directory, record = max(built)
    return directory, record


@contextlib.contextmanager
def _lock(path: Path, say: Say) -> Iterator[None]:
    with path.open("a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say("another kernel build is running; waiting for it")
            fcntl.lockf(f, fcntl.LOCK_EX)
        yield


def own_suite() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    raise KernelBuildError("cannot tell this machine's Debian suite (no VERSION_CODENAME in /etc/os-release)")


class PrivateApt:
    """apt-get and apt-cache with their own sources, lists and cache under one directory."""

    def __init__(self, directory: Path, own_suite: str) -> None:
        self.directory = directory
        self.suites = [*kernel_source.NEW_SUITES, own_suite]
        self.own_suite = own_suite

    def _options(self) -> list[str]:
        d = self.directory
        opts = [
            "-o", "Dir::Etc::SourceList=/dev/null",
            "-o", f"Dir::Etc::SourceParts={d / 'sources'}",
            "-o", f"Dir::State::Lists={d / 'lists'}",
            "-o", f"Dir::Cache={d / 'cache'}",
        ]  # fmt: skip
        if os.geteuid() == 0:
            opts += ["-o", "APT::Sandbox::User=root"]  # our directories are not the _apt user's
        return opts

    def _sources(self, kind: str, suites: list[str]) -> None:
        """This apt's only sources: the suites of Debian's archive (APPPOT_DEBIAN_MIRROR, else deb.debian.org)."""
        d = self.directory
        for sub in ("sources", "lists/partial", "cache/archives/partial"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        mirror = os.environ.get(MIRROR_ENV) or MIRROR
        for old in (d / "sources").glob("*.sources"):  # e.g. apppot-kernel.sources of earlier versions
            old.unlink()
        (d / "sources" / "apppot.sources").write_text(
            f"Types: {kind}\nURIs: {mirror}\nSuites: {' '.join(suites)}\nComponents: main\nSigned-By: {KEYRING}\n"
        )

    def choose(self) -> kernel_source.Choice:
        self._sources("deb", self.suites)
        try:
            run(["apt-get", *self._options(), "update"])
            names = run(["apt-cache", *self._options(), "pkgnames", "linux-source-"]).stdout.decode().split()
            madison = run(["apt-cache", *self._options(), "madison", *names]).stdout.decode() if names else ""
        except HostError as e:
            raise KernelBuildError(f"cannot look up Debian's kernel sources: {e}") from None
        choice = kernel_source.choose(kernel_source.parse_madison(madison), self.own_suite)
        if choice is None:
            raise KernelBuildError(f"no linux-source package in {', '.join(self.suites)}; check the network and the mirror")
        return choice

    def binary_sources(self) -> None:
        """Binary packages of this machine's suite only, with fresh lists."""
        self._sources("deb", [self.own_suite])
        run(["apt-get", *self._options(), "update"])

    def query(self, argv: list[str], cwd: Path | None = None) -> str:
        """apt-get or apt-cache through this configuration; their output."""
        return run([argv[0], *self._options(), *argv[1:]], cwd=cwd).stdout.decode()

    def upstream_tarball(self, package: str, into: Path) -> Path:
        """The upstream release tarball in the source package of this machine's suite, as
        INTO/PACKAGE-VERSION.tar.gz (apt-get source --download-only, through this private apt)."""
        self._sources("deb-src", [self.own_suite])
        download = into / f"{package}-source"
        download.mkdir(parents=True)
        run(["apt-get", *self._options(), "update"])
        run(["apt-get", *self._options(), "source", "--download-only", package], cwd=download)
        origs = list(download.glob(f"{package}_*.orig.tar.gz"))
        if len(origs) != 1:
            raise HostError(f"the source package {package} has no single .orig.tar.gz")
        version = origs[0].name.removeprefix(f"{package}_").removesuffix(".orig.tar.gz")
        return origs[0].rename(into / f"{package}-{version}.tar.gz")

    def fetch_package(self, name: str, version: str, work: Path) -> Path:
        """Download one package into WORK and unpack it there (the .deb is removed); the unpacked tree."""
        dl = work / "download"
        dl.mkdir()
        run(["apt-get", *self._options(), "download", f"{name}={version}"], cwd=dl)
        debs = list(dl.glob("*.deb"))
        if len(debs) != 1:
            raise HostError(f"apt-get download gave {len(debs)} packages, expected one")
        unpacked = work / "deb"
        run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
        debs[0].unlink()
        return unpacked

    def download(self, package: kernel_source.SourcePackage, work: Path, say: Say) -> Path:
        say(f"downloading {package.name} {package.version}")
        try:
            unpacked = self.fetch_package(package.name, package.version, work)
        except HostError as e:
            raise KernelBuildError(f"downloading {package.name} failed: {e}") from None
        tarballs = list((unpacked / "usr" / "src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise KernelBuildError(f"{package.name} does not hold one linux-source tarball under /usr/src")
        return tarballs[0]


def _unpack(tarball: Path, work: Path, say: Say) -> Path:
    say(f"unpacking {tarball.name}")
    run(["tar", "-xf", str(tarball), "-C", str(work)])
    tarball.unlink()
    trees = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("linux-source-")]
    if len(trees) != 1 or not (trees[0] / "arch" / "um").is_dir():
        raise KernelBuildError(f"{tarball.name} did not unpack into one kernel tree with arch/um")
    return trees[0]


def _make(tree: Path, *targets: str) -> None:
    try:
        run(["make", "-C", str(tree), "ARCH=um", *targets])
    except HostError as e:
        raise KernelBuildError(str(e)) from None


def apply_fragment(tree: Path, fragment: bytes) -> None:
    """Our options onto tree/.config with the kernel's own scripts/config."""
    args = kernel_config.scripts_config_args(kernel_config.parse_fragment(fragment.decode()))
    run([str(tree / "scripts" / "config"), "--file", str(tree / ".config"), *args])


def known_symbols(tree: Path) -> set[str]:
    """Every config symbol this kernel's Kconfig files declare."""
    symbols: set[str] = set()
    for kconfig in tree.rglob("Kconfig*"):
        if kconfig.is_file():
            symbols.update(m.decode() for m in _KCONFIG_SYMBOL.findall(kconfig.read_bytes()))
    return symbols


def _configure(tree: Path, fragment: bytes, say: Say) -> None:
    say("configuring: defconfig, AppPot's options (src/apppot/data/apppot-um.config), olddefconfig")
    _make(tree, "defconfig")
    apply_fragment(tree, fragment)
    _make(tree, "olddefconfig")
    final = kernel_config.parse_dotconfig((tree / ".config").read_text())
    wrong = kernel_config.unmet(kernel_config.parse_fragment(fragment.decode()), final, known_symbols(tree))
    if wrong:
        raise KernelBuildError(f"the kernel's configuration refused: {'; '.join(wrong)} (its dependencies are missing)")


def _compile(tree: Path, jobs: int, say: Say) -> None:
    say(f"compiling with {jobs} jobs (about 9 minutes on 2 cores)")
    progress = Progress(sys.stderr.isatty())
    with subprocess.Popen(
        ["make", "-C", str(tree), "ARCH=um", f"-j{jobs}", "linux"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdout is not None
        tail: list[bytes] = []
        for line in proc.stdout:
            tail = [*tail[-19:], line]
            if line.lstrip().startswith(b"CC "):
                progress.step()
        proc.wait()
    progress.done()
    if proc.returncode != 0:
        errors = [ln.decode(errors="replace").strip() for ln in tail if b"error" in ln.lower()]
        raise KernelBuildError(f"compiling the kernel failed: {(errors or ['see make output'])[-1]}")


class Progress:
    """Compiled-file count and elapsed time: one rewritten line on a terminal, a line every 30 s otherwise."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.count = 0
        self.started = time.monotonic()
        self.last_line = self.started

    def _text(self) -> str:
        elapsed = int(time.monotonic() - self.started)
        pct = min(99, 100 * self.count // EXPECTED_FILES)
        return f"apppot: compiling: {self.count} files (~{pct}%), {elapsed // 60}m{elapsed % 60:02d}s"

    def step(self) -> None:
        self.count += 1
        now = time.monotonic()
        if self.tty and now - self.last_line > 0.2:
            sys.stderr.write(f"\r{self._text()}\x1b[K")
            sys.stderr.flush()
            self.last_line = now
        elif not self.tty and now - self.last_line > 30:
            sys.stderr.write(self._text() + "\n")
            sys.stderr.flush()
            self.last_line = now

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _install(tree: Path, target: Path, record: KernelRecord) -> None:
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shutil.copy2(tree / "linux", staging / "linux")
    shutil.copy2(tree / ".config", staging / "config")
    shutil.copy2(tree / "scripts" / "config", staging / "scripts-config")
    record.write(staging)
    for path in staging.iterdir():
        path.chmod(0o755 if path.name in ("linux", "scripts-config") else 0o644)
    staging.chmod(0o755)
    if target.exists():
        shutil.rmtree(target)  # a rebuild (--force) of the same identity
    staging.rename(target)


def _make_default(root: Path, target: Path) -> None:
    link = root / f".default.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(target.name)
    link.replace(root / "default")

"""Building a Debian appliance from a recipe with mmdebstrap, into the image cache.

mmdebstrap (Debian's own bootstrapper) makes the root tree with the recipe's packages (the exact
versions of the recipe's lock, if it has one); its customize hooks copy in the recipe's files, the
agent and the autorun script, and run the recipe's commands inside the new system. `mkfs.ext4 -d`
turns the tree into the image, which appears under its final name only when everything succeeded.
Two builds against one mirror state give the same image, byte for byte (apppot.images.reproducible).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from apppot import snap
from apppot.backends.uml import AGENT_SERVICE, SYSTEMD_PATH
from apppot.errors import HostError
from apppot.images import lock as locking
from apppot.images import reproducible, snaptool, tiny
from apppot.images.recipe import DEFAULT_MIRROR, Recipe
from apppot.images.store import ImageRecord, Owner, cache_owner, image_stem, images_dir, make_dirs, replace_file
from apppot.kernel_build import MIRROR_ENV
from apppot.proc import run, which
from apppot.protocol import PROTOCOL_VERSION
from apppot.say import Say

BUILDER_VERSION = "2"  # 2: reproducible (one fixed time, ids from the recipe, a settled tree)
# What every Debian appliance needs besides the recipe's packages: sudo for the job's user (the
# seed's promise), the tools the agent uses beyond the Essential set, and Python for apppot-snap.
ALWAYS = ("sudo", "mount", "mawk", "python3")  # python3: apppot-snap
STEPS = 5
COMMANDS_SCRIPT = "/root/.apppot-recipe-commands"


class BuiltImage(NamedTuple):
    path: Path
    record: ImageRecord
    reused: bool
    lock: Path | None = None  # the lock this build wrote (apppot image build --lock)


def recipe_id(recipe: Recipe) -> str:
    """Hash of everything that decides the image: the recipe, the files it names, the agent, this builder."""
    h = hashlib.sha256()
    h.update(json.dumps({"builder": BUILDER_VERSION, **recipe.identity()}, sort_keys=True).encode())
    h.update(tiny.agent_source())
    h.update(_agent_service().read_bytes())
    h.update(snaptool.digest())
    for copy in recipe.files:
        for path in sorted([copy.source, *copy.source.rglob("*")]) if copy.source.is_dir() else [copy.source]:
            h.update(str(path.relative_to(copy.source.parent)).encode() + b"\0")
            h.update(f"{path.lstat().st_mode:o}".encode())
            if path.is_symlink():
                h.update(os.readlink(path).encode())
            elif path.is_file():
                h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _agent_service() -> Path:
    return tiny.AGENT.with_name("apppot-agent.service")


def _mirror(recipe: Recipe) -> str:
    return recipe.base.mirror or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR


def _check_host() -> None:
    if os.geteuid() != 0:
        raise HostError(
            "building a Debian appliance needs root (mmdebstrap's root mode, and mkfs.ext4 keeps the "
            "files' owners): run the build as root, e.g. sudo env XDG_CACHE_HOME=$HOME/.cache "
            '"$(command -v apppot)" image build ... (sudo does not search your PATH)'
        )
    for program, package in (("mmdebstrap", "mmdebstrap"), ("mkfs.ext4", "e2fsprogs")):
        if which(program) is None:
            raise HostError(f"{program} is not installed: sudo apt-get install {package}")


def _agent_dirs(root: Path) -> None:
    """The agent's mount points and stream pipes (mmdebstrap empties /run when it finishes)."""
    for directory in ("run/apppot", "run/apppot-agent/out", "run/apppot-streams", "home/user/job"):
        (root / directory).mkdir(parents=True, exist_ok=True)
        os.chmod(root / directory, 0o755)
    os.chmod(root / "run/apppot-agent", 0o700)  # the report directory's parent: the agent's alone
    os.chmod(root / "home/user", 0o755)
    for name in ("stdin", "stdout", "stderr"):
        with contextlib.suppress(FileExistsError):
            os.mkfifo(root / "run/apppot-streams" / name, 0o600)


def _enable_full_boot(root: Path) -> None:
    """Where the image has systemd: the agent's service enabled, and no getty on the consoles the job uses."""
    if not (root / SYSTEMD_PATH.lstrip("/")).exists():
        return
    system = root / "etc/systemd/system"
    wants = system / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for link, target in (
        (wants / "apppot-agent.service", AGENT_SERVICE),
        (system / "getty@.service", "/dev/null"),
        (system / "serial-getty@.service", "/dev/null"),
    ):
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(target)


def _stage(recipe: Recipe, stage: Path, epoch: int) -> None:
    """The tree the customize hook copies over the new system: the recipe's files, the agent, the autorun,
    every one with the build's time (not when the recipe's files were checked out)."""
    _agent_dirs(stage)
    agent = stage / "usr/sbin/apppot-init"
    agent.parent.mkdir(parents=True)
    agent.write_bytes(tiny.agent_source())
    os.chmod(agent, 0o755)
    snaptool.build(stage / "usr/sbin/apppot-snap")
    excludes = stage / snap.EXCLUDE_FILE.lstrip("/")
    excludes.parent.mkdir(parents=True)
    excludes.write_text(snap.DEFAULT_EXCLUDES)
    service = stage / AGENT_SERVICE.lstrip("/")
    service.parent.mkdir(parents=True)
    shutil.copyfile(_agent_service(), service)
    os.chmod(service, 0o644)
    (stage / "etc/hostname").write_text("apppot\n")
    (stage / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tapppot\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    if recipe.autorun is not None:
        autorun = stage / "home/user/apppot-autorun"
        autorun.write_text(recipe.autorun)
        os.chmod(autorun, 0o755)
    for copy in recipe.files:
        target = stage / copy.target.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if copy.source.is_dir():
            shutil.copytree(copy.source, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(copy.source, target)
        if copy.mode is not None:
            os.chmod(target, copy.mode)
    if recipe.commands:
        script = stage / COMMANDS_SCRIPT.lstrip("/")
        script.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(script.parent, 0o700)
        lines = ["set -e", "export DEBIAN_FRONTEND=noninteractive HOME=/root", "cd /root"]
        for command in recipe.commands:
            lines += [f"echo {shlex.quote('apppot: recipe command: ' + command)}", command]
        script.write_text("\n".join(lines) + "\n")
    reproducible.clamp_times(stage, epoch, reset=True)


def requested_packages(recipe: Recipe) -> list[str]:
    """What the build asks apt for: the recipe's packages and AppPot's own (ALWAYS)."""
    return sorted(set(ALWAYS) | set(recipe.packages))


def _package_name(spec: str) -> str:
    return spec.split("=", 1)[0].split(":", 1)[0]


def mmdebstrap_argv(recipe: Recipe, stage: Path, root: Path) -> list[str]:
    """The mmdebstrap command line (pure; tested with golden lists). With a lock, every package is
    named with its locked version."""
    packages = [p.spec for p in recipe.lock.packages] if recipe.lock else requested_packages(recipe)
    hooks = [f"sync-in {stage} /"]
    if recipe.lock and recipe.lock.auto:  # every package was named: apt marked none automatically installed
        hooks.insert(0, f'chroot "$1" apt-mark auto {" ".join(recipe.lock.auto)}')
    if recipe.commands:
        hooks += [f'chroot "$1" /bin/sh {COMMANDS_SCRIPT}', f'rm -f "$1{COMMANDS_SCRIPT}"']
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory", "--verbose"]
    argv += [f"--include={','.join(packages)}"]
    argv += [f"--components={','.join(recipe.base.components)}"]
    argv += [f"--customize-hook={hook}" for hook in hooks]
    argv += [recipe.base.suite, str(root), _mirror(recipe)]
    return argv


class StepPrinter:
    """Step lines, and mmdebstrap's own progress lines under them (unless quiet)."""

    def __init__(self, say: Say, quiet: bool) -> None:
        self.say = say
        self.quiet = quiet
        self.started = time.monotonic()
        self.number = 0

    def step(self, text: str) -> None:
        self.number += 1
        if not self.quiet:
            elapsed = int(time.monotonic() - self.started)
            self.say(f"[{self.number}/{STEPS}] {text} ({elapsed // 60}m{elapsed % 60:02d}s)")

    def detail(self, line: str) -> None:
        if not self.quiet and line.strip():
            sys.stderr.write(f"    {line.rstrip()}\n")
            sys.stderr.flush()


def _run_streaming(argv: list[str], printer: StepPrinter, what: str, env: dict[str, str], errors: list[str]) -> None:
    """Run a long build step, passing its interesting lines on (its error lines into ``errors``); the
    tail of its output on failure."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={**os.environ, **env},
        )
    except OSError as e:
        raise HostError(f"cannot run {argv[0]}: {e.strerror}") from e
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            tail = [*tail[-19:], line.rstrip()]
            if line.startswith("E: "):
                errors.append(line.rstrip())
            if line.startswith(("I: ", "E: ", "W: ", "apppot: ")):
                printer.detail(line)
    if proc.returncode != 0:
        shown = "\n".join(tail[-10:])
        raise HostError(f"{what} failed (status {proc.returncode}); its last lines:\n{shown}")


def _architecture() -> str:
    return run(["dpkg", "--print-architecture"], package="dpkg").stdout.decode().strip()


def _check_lock(recipe: Recipe, architecture: str) -> None:
    assert recipe.lock is not None
    needed = {_package_name(p) for p in requested_packages(recipe)}
    why = locking.out_of_date(recipe.lock, recipe.base.suite, architecture, recipe.packages, needed)
    if why:
        raise locking.LockError(
            f"lock {locking.lock_path(recipe.path)} does not fit the recipe: {why}; "
            "write it afresh with apppot image build --lock"
        )


def _bootstrap(recipe: Recipe, stage: Path, root: Path, printer: StepPrinter, epoch: int) -> None:
    """mmdebstrap, with the build's time; a locked version the mirror lacks is one line naming them all."""
    errors: list[str] = []
    try:
        _run_streaming(mmdebstrap_argv(recipe, stage, root), printer, "mmdebstrap", {reproducible.SDE_ENV: str(epoch)}, errors)
    except HostError:
        missing = locking.missing_from_mirror(errors)
        if recipe.lock is None or not missing:
            raise
        shown = " ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise locking.LockError(
            f"the mirror {_mirror(recipe)} no longer has {len(missing)} package version(s) of lock "
            f"{locking.lock_path(recipe.path)}: {shown}; build with --lock to lock the mirror's versions instead, "
            "or set [base] mirror to a snapshot that has them (snapshot.debian.org)"
        ) from None


def _installed(root: Path) -> list[tuple[str, str, str]]:
    """(name, version, architecture) of every package installed in the new system."""
    out = run(
        [
            "dpkg-query",
            f"--admindir={root}/var/lib/dpkg",
            "-W",
            "-f",
            "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n",
        ],
        package="dpkg",
    ).stdout.decode()
    rows = [line.split("\t") for line in out.splitlines()]
    return sorted((name, version, arch) for status, name, version, arch in rows if status.startswith("ii"))


def _auto_installed(root: Path, architecture: str) -> list[str]:
    try:
        text = (root / "var/lib/apt/extended_states").read_text()
    except FileNotFoundError:
        return []
    return locking.auto_installed(text, architecture)


def _write_lock(recipe: Recipe, lock: locking.Lock) -> Path:
    """The lock beside the recipe, given to the recipe's owner (root builds a user's recipe)."""
    path = locking.lock_path(recipe.path)
    try:
        replace_file(path, locking.render_lock(lock).encode())
        st = recipe.path.stat()
        if os.geteuid() == 0 and st.st_uid != 0:
            os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    except OSError as e:
        raise HostError(
            f"the image is built, but its lock {path} cannot be written: {e.strerror}; "
            "make the recipe's directory writable and build with --lock again"
        ) from e
    return path


def build(recipe: Recipe, *, force: bool = False, quiet: bool = False, relock: bool = False, say: Say) -> BuiltImage:
    """Build the recipe's image into the cache, or return the one already built from the same inputs.

    relock: resolve the packages against the mirror afresh (whatever the recipe's lock says), and write
    what was installed as the recipe's lock."""
    if relock:
        recipe = recipe._replace(lock=None)
    ident = recipe_id(recipe)
    directory = images_dir()
    target = directory / f"{image_stem(recipe.name, ident)}.img"
    if not relock and not force and target.exists() and target.with_suffix(".json").exists():
        return BuiltImage(target, ImageRecord.read(target.with_suffix(".json")), reused=True)
    _check_host()
    architecture = _architecture()
    if recipe.lock is not None:
        _check_lock(recipe, architecture)
    when = reproducible.choose_time(
        os.environ.get(reproducible.SDE_ENV), recipe.lock, lambda: reproducible.release_epoch(_mirror(recipe), recipe.base.suite)
    )
    epoch = when.epoch
    owner = cache_owner(directory)
    make_dirs(directory, owner)
    printer = StepPrinter(say, quiet)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".build-{recipe.name}-", dir=directory) as tmp:
        stage, root, image = Path(tmp) / "stage", Path(tmp) / "root", Path(tmp) / "image"
        stage.mkdir()
        _stage(recipe, stage, epoch)
        versions = "their locked versions" if recipe.lock else "the mirror's versions"
        printer.step(
            f"bootstrapping Debian {recipe.base.suite} with {len(requested_packages(recipe))} packages ({versions}) "
            f"from {_mirror(recipe)}, files dated {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(epoch))} UTC "
            f"(from {when.source})"
        )
        _bootstrap(recipe, stage, root, printer, epoch)
        lock = recipe.lock or locking.make_lock(
            recipe.base.suite, architecture, epoch, recipe.packages, _installed(root), _auto_installed(root, architecture)
        )
        if relock:  # named, and its filesystem ids derived, as the recipe with this lock
            ident = recipe_id(recipe._replace(lock=lock))
            target = directory / f"{image_stem(recipe.name, ident)}.img"
        _agent_dirs(root)
        _enable_full_boot(root)
        reproducible.settle_tree(root, epoch)
        printer.step("recording the base state for apppot-snap")
        reproducible.clamp_times(root, epoch)
        # Recorded at the build's time: the many files clamped to it count as changed within the second
        # of recording, so apppot-snap hashes them rather than trust their (size, time) (a backup that
        # keeps the original's time, as useradd's /etc/group- does, would otherwise pass unseen).
        base = snap.write_manifest(snap.scan(str(root)), str(root / snap.BASE_MANIFEST.lstrip("/")), epoch=epoch)
        (root / snap.BASE_ID.lstrip("/")).write_text(base.id + "\n")
        reproducible.clamp_times(root, epoch)
        printer.step(f"making the {recipe.size_bytes >> 20} MiB ext4 image")
        run(
            reproducible.mkfs_argv(recipe.name, ident, root, image, recipe.size_bytes),
            env=reproducible.fixed_clock(epoch),
            package="e2fsprogs",
        )
        reproducible.pin_inode_times(image, epoch, Path(tmp))
        printer.step("hashing the image")
        record = ImageRecord(
            name=recipe.name,
            recipe=str(recipe.path),
            recipe_id=ident,
            content_id=tiny.image_id(image),
            agent=hashlib.sha256(tiny.agent_source()).hexdigest(),
            base_id=base.id,
            protocol=PROTOCOL_VERSION,
            distribution=recipe.base.distribution,
            suite=recipe.base.suite,
            packages=requested_packages(recipe),
            size_bytes=recipe.size_bytes,
            built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            build_seconds=round(time.monotonic() - started, 1),
            source_date_epoch=epoch,
            installed=tuple(p.spec for p in lock.packages),
        )
        printer.step(f"installing {target.name}")
        _install(image, target, record, owner, replace=force or relock)
    return BuiltImage(target, record, reused=False, lock=_write_lock(recipe, lock) if relock else None)


def _install(image: Path, target: Path, record: ImageRecord, owner: Owner | None, *, replace: bool) -> None:
    record_path = target.with_suffix(".json")
    os.chmod(image, 0o444)
    # The record last: an image without a record is not listed, so a build stopped between
    # the two steps leaves nothing usable under the final name.
    if replace:
        with contextlib.suppress(FileNotFoundError):
            record_path.unlink()
    if owner is not None:  # root built into a user's cache: the user can remove and rebuild it
        os.chown(image, *owner)
    image.replace(target)
    record.write(record_path)
    if owner is not None:
        os.chown(record_path, *owner, follow_symlinks=False)

"""Building a Debian appliance from a recipe with mmdebstrap, into the image cache.

mmdebstrap (Debian's own bootstrapper) makes the root tree with the recipe's packages; its
customize hooks copy in the recipe's files, the agent and the autorun script, and run the
recipe's commands inside the new system. `mkfs.ext4 -d` turns the tree into the image, which
appears under its final name only when everything succeeded.
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
from apppot.images import snaptool, tiny
from apppot.images.recipe import DEFAULT_MIRROR, Recipe
from apppot.images.store import ImageRecord, cache_owner, image_stem, images_dir, make_dirs
from apppot.kernel_build import MIRROR_ENV
from apppot.proc import run, which
from apppot.protocol import PROTOCOL_VERSION
from apppot.say import Say

BUILDER_VERSION = "1"
# What every Debian appliance needs besides the recipe's packages: sudo for the job's user (the
# seed's promise), the tools the agent uses beyond the Essential set, and Python for apppot-snap.
ALWAYS = ("sudo", "mount", "mawk", "python3")  # python3: apppot-snap
STEPS = 5
COMMANDS_SCRIPT = "/root/.apppot-recipe-commands"


class BuiltImage(NamedTuple):
    path: Path
    record: ImageRecord
    reused: bool


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


def _stage(recipe: Recipe, stage: Path) -> None:
    """The tree the customize hook copies over the new system: the recipe's files, the agent, the autorun."""
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


def mmdebstrap_argv(recipe: Recipe, stage: Path, root: Path) -> list[str]:
    """The mmdebstrap command line (pure; tested with golden lists)."""
    packages = sorted(set(ALWAYS) | set(recipe.packages))
    hooks = [f"sync-in {stage} /"]
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


def _run_streaming(argv: list[str], printer: StepPrinter, what: str) -> None:
    """Run a long build step, passing its interesting lines on; the tail of its output on failure."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as e:
        raise HostError(f"cannot run {argv[0]}: {e.strerror}") from e
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            tail = [*tail[-19:], line.rstrip()]
            if line.startswith(("I: ", "E: ", "W: ", "apppot: ")):
                printer.detail(line)
    if proc.returncode != 0:
        shown = "\n".join(tail[-10:])
        raise HostError(f"{what} failed (status {proc.returncode}); its last lines:\n{shown}")


def build(recipe: Recipe, *, force: bool = False, quiet: bool = False, say: Say) -> BuiltImage:
    """Build the recipe's image into the cache, or return the one already built from the same inputs."""
    ident = recipe_id(recipe)
    directory = images_dir()
    stem = image_stem(recipe.name, ident)
    target = directory / f"{stem}.img"
    record_path = target.with_suffix(".json")
    if not force and target.exists() and record_path.exists():
        return BuiltImage(target, ImageRecord.read(record_path), reused=True)
    _check_host()
    owner = cache_owner(directory)
    make_dirs(directory, owner)
    printer = StepPrinter(say, quiet)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".build-{stem}-", dir=directory) as tmp:
        stage, root, image = Path(tmp) / "stage", Path(tmp) / "root", Path(tmp) / "image"
        stage.mkdir()
        _stage(recipe, stage)
        packages = sorted(set(ALWAYS) | set(recipe.packages))
        printer.step(f"bootstrapping Debian {recipe.base.suite} with {len(packages)} packages from {_mirror(recipe)}")
        _run_streaming(mmdebstrap_argv(recipe, stage, root), printer, "mmdebstrap")
        _agent_dirs(root)
        _enable_full_boot(root)
        printer.step("recording the base state for apppot-snap")
        base = snap.write_manifest(snap.scan(str(root)), str(root / snap.BASE_MANIFEST.lstrip("/")))
        (root / snap.BASE_ID.lstrip("/")).write_text(base.id + "\n")
        printer.step(f"making the {recipe.size_bytes >> 20} MiB ext4 image")
        run(
            ["mkfs.ext4", "-q", "-F", "-L", recipe.name[:16], "-d", str(root), str(image), str(recipe.size_bytes >> 10) + "k"],
            package="e2fsprogs",
        )
        printer.step("hashing the image")
        content = tiny.image_id(image)
        record = ImageRecord(
            name=recipe.name,
            recipe=str(recipe.path),
            recipe_id=ident,
            content_id=content,
            agent=hashlib.sha256(tiny.agent_source()).hexdigest(),
            base_id=base.id,
            protocol=PROTOCOL_VERSION,
            distribution=recipe.base.distribution,
            suite=recipe.base.suite,
            packages=packages,
            size_bytes=recipe.size_bytes,
            built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            build_seconds=round(time.monotonic() - started, 1),
        )
        printer.step(f"installing {target.name}")
        os.chmod(image, 0o444)
        # The record last: an image without a record is not listed, so a build stopped between
        # the two steps leaves nothing usable under the final name.
        if force:
            with contextlib.suppress(FileNotFoundError):
                record_path.unlink()
        if owner is not None:  # root built into a user's cache: the user can remove and rebuild it
            os.chown(image, *owner)
        image.replace(target)
        record.write(record_path)
        if owner is not None:
            os.chown(record_path, *owner, follow_symlinks=False)
    return BuiltImage(target, record, reused=False)

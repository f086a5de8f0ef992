"""`apppot image publish`: copy an image, its record and the kernel into a site image directory, for every user.

Each file is written beside its final name as .NAME.PID.tmp (which lookups pass over), made 0644 (the
kernel 0755), synced, then renamed into place: a job never sees half a file, and a job running on a
replaced image keeps the old one until it ends. The image goes first and its record last, as the record
is what makes a built image visible; a signature (apppot image sign) goes with its record, just before it,
and an image replaced by an unsigned one keeps no signature. Sparse images stay sparse.

Root may publish from a user's cache, so every source is hostile input: opened without following a link,
never waited on, a regular file or refused; and the image is copied from the descriptor whose bytes were
checked against its record's content id (the tiny appliance's: its .sha256, when it has one).
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import os
import stat
import time
from pathlib import Path
from typing import NamedTuple

from apppot.errors import ImageError
from apppot.images import signatures, sites, store, tiny, verify
from apppot.images.holes import data_regions
from apppot.say import Say
from apppot.userpath import kind

FILE_MODE = 0o644
EXEC_MODE = 0o755
DIR_MODE = 0o755
_CHUNK = 4 << 20
PROGRESS_EVERY_S = 2.0
KERNEL_FILES = ("linux", "kernel.json", "config")  # the binary, AppPot's build record, its .config


class Published(NamedTuple):
    name: str
    directory: Path
    image: Path
    record: Path | None  # None: the tiny appliance, which has none
    signature: Path | None  # the record's signature (apppot image sign), if it has one there
    reused: bool  # the same image was published there already
    replaced: list[str]  # the other images of that name it replaced (--force)
    kernel: Path | None  # None: --no-kernel
    kernel_reused: bool
    copied_bytes: int
    seconds: float


def publish(name: str, directory: Path | None, *, force: bool, kernel: str | None, with_kernel: bool, say: Say) -> Published:
    """Publish the image called name (as --image NAME finds it) into directory (default: the first site directory)."""
    started = time.monotonic()
    source = store.find_by_name(name)
    if source is None:
        raise ImageError(f"no image named {name} to publish; build it first (apppot image build RECIPE.toml, or build-tiny)")
    if directory is None:
        candidates = sites.site_dirs()
        if not candidates:
            raise ImageError(
                f"{sites.IMAGE_PATH_ENV} is empty, so there is no site image directory to publish into; "
                f"give the directory: apppot image publish {name} DIR"
            )
        directory = candidates[0]
    target = _target_dir(directory)
    existing = [image for image in store.stored_images(target) if image.name == name]
    same = next((image for image in existing if _same_image(image, source)), None)
    others = [image for image in existing if image is not same]
    if others and not force:
        raise ImageError(
            f"{target} already has a different image named {name} ({others[0].path.name}); "
            "publish with --force to replace it (jobs running on it keep it until they end)"
        )
    kernel_source = _kernel_to_publish(kernel, target) if with_kernel else None
    kernel_dir = target / sites.KERNEL_DIR
    kernel_same = kernel_source is None or _same_kernel(kernel_source, kernel_dir)
    if not kernel_same and (kernel_dir / "linux").exists() and not force:
        raise ImageError(
            f"{kernel_dir / 'linux'} is a different kernel from the one yours would be ({kernel_source}); "
            "publish with --force to replace it, or with --no-kernel to leave it"
        )
    copied = 0
    image_path = target / source.path.name
    record_path = image_path.with_suffix(store.RECORD_SUFFIX) if source.record else None
    signature_path = signatures.signature_path(image_path)
    signed = source.record is not None and os.path.lexists(signatures.signature_path(source.path))
    built_id = source.path.with_suffix(tiny.ID_SUFFIX)
    if same is None:
        image_fd = _open_source(source.path)
        try:
            expected = source.record.content_id if source.record is not None else _tiny_id(built_id, source.path)
            if expected is not None:  # a tiny appliance built before AppPot wrote its id has none to check
                verify.check_open_file(image_fd, source.path, expected)
            copied += _install(source.path, image_path, FILE_MODE, say, image_fd)
        finally:
            os.close(image_fd)
    if record_path is not None and (same is None or (signed and not _same_signed(source.path, image_path))):
        # The signature before the record it signs; an image replaced unsigned keeps no signature of another.
        if signed:
            copied += _install(signatures.signature_path(source.path), signature_path, FILE_MODE, say)
        else:
            signature_path.unlink(missing_ok=True)
        copied += _install(source.path.with_suffix(store.RECORD_SUFFIX), record_path, FILE_MODE, say)
    if source.record is None and os.path.lexists(built_id):  # the tiny appliance's content id, to verify it against
        copied += _install(built_id, image_path.with_suffix(tiny.ID_SUFFIX), FILE_MODE, say)
    for old in others:  # the record first: it is what makes an image visible
        if old.path == image_path:
            continue  # replaced by the rename above
        old.path.with_suffix(store.RECORD_SUFFIX).unlink(missing_ok=True)
        signatures.signature_path(old.path).unlink(missing_ok=True)
        old.path.with_suffix(tiny.ID_SUFFIX).unlink(missing_ok=True)
        old.path.unlink(missing_ok=True)
    if kernel_source is not None and not kernel_same:
        _make_dir(kernel_dir)
        own_build = _is_own_build(kernel_source)
        for file_name in KERNEL_FILES:
            part = kernel_source.parent / file_name if file_name != "linux" else kernel_source
            if os.path.lexists(part) and (own_build or file_name == "linux"):
                copied += _install(part, kernel_dir / file_name, EXEC_MODE if file_name == "linux" else FILE_MODE, say)
            else:
                (kernel_dir / file_name).unlink(missing_ok=True)  # not the record of the kernel it replaced
    _sync_dir(target)
    return Published(
        name=name,
        directory=target,
        image=image_path,
        record=record_path,
        signature=signature_path if record_path is not None and signature_path.is_file() else None,
        reused=same is not None,
        replaced=[old.path.name for old in others if old.path != image_path],
        kernel=kernel_dir / "linux" if kernel_source is not None else None,
        kernel_reused=kernel_source is not None and kernel_same,
        copied_bytes=copied,
        seconds=round(time.monotonic() - started, 3),
    )


def _target_dir(directory: Path) -> Path:
    """The site directory, made (0755) if missing, and checked as a user's lookup will check it."""
    if not directory.is_absolute():
        directory = Path.cwd() / directory
    _make_dir(directory)
    sites.check_directory(directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ImageError(f"cannot write the site image directory {directory}; publish as its owner, or into another DIR")
    return directory


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        return
    except OSError as e:
        raise ImageError(
            f"cannot make the site image directory {directory}: {e.strerror}; have its administrator make it yours "
            f"(install -d -m 0755 -o {_user()} {directory}), or give another directory (apppot image publish NAME DIR)"
        ) from None
    directory.chmod(DIR_MODE)  # whatever the umask: every user reads it


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _same_image(published: store.StoredImage, source: store.StoredImage) -> bool:
    if published.path.name != source.path.name:
        return False
    if source.record is None:  # the tiny appliance: its name is the hash of its inputs, its bytes follow
        return True
    return published.record is not None and published.record.content_id == source.record.content_id


def _same_signed(source: Path, published: Path) -> bool:
    """Whether the published copy of the same image already has the source's record and signature, byte for byte."""
    files = (signatures.record_path, signatures.signature_path)
    try:
        return all(filecmp.cmp(file(source), file(published), shallow=False) for file in files)
    except OSError:
        return False


def _kernel_to_publish(explicit: str | None, target: Path) -> Path | None:
    """The kernel `apppot start` would use (or --kernel); None when it is the one published there already."""
    from apppot.kernel import find_kernel

    found = find_kernel(explicit).path
    with contextlib.suppress(OSError):
        if found.samefile(target / sites.KERNEL_DIR / "linux"):
            return None
    return found


def _is_own_build(kernel: Path) -> bool:
    """Whether kernel is one `apppot kernel build` made in the user's cache: only then is the record and
    config beside it its own (beside a --kernel elsewhere, they may be anyone's)."""
    from apppot.kernel import kernels_dir

    return kernel.resolve().parent.parent == kernels_dir().resolve()


def _same_kernel(source: Path, kernel_dir: Path) -> bool:
    try:
        return filecmp.cmp(source, kernel_dir / "linux", shallow=False)
    except OSError:
        return False


def _open_source(path: Path) -> int:
    """A file to publish, opened read-only: never through a link, never waiting on a FIFO, a regular file only."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):  # not even opened: opening a device can do something
            raise ImageError(
                f"cannot publish {path}: it is {kind(mode)}, not a regular file; remove it, or replace it by the file itself"
            )
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageError(f"cannot publish {path}: {e.strerror}; check the file") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # replaced between the lstat and the open
        os.close(fd)
        raise ImageError(
            f"cannot publish {path}: it is {kind(mode)}, not a regular file; remove it, or replace it by the file itself"
        )
    return fd


def _tiny_id(id_file: Path, image: Path) -> str | None:
    """The tiny appliance's content id from its .sha256 (opened as every source is), None when it has none."""
    if not os.path.lexists(id_file):
        return None
    fd = _open_source(id_file)
    try:
        data = os.read(fd, tiny.ID_FILE_LIMIT + 1)
    finally:
        os.close(fd)
    found = tiny.parse_built_id(data, image)
    if found is None:
        raise ImageError(f"cannot publish {image}: {id_file} is not its content id; rebuild it (apppot image build-tiny --force)")
    return found


def _install(source: Path, final: Path, mode: int, say: Say, src: int | None = None) -> int:
    """Copy source (or the descriptor src, opened by _open_source) to final through a temporary file and a
    rename; returns the bytes copied."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    own = src is None
    src_fd = _open_source(source) if src is None else src
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            copied = _copy_sparse(src_fd, fd, source, say)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fix = "free space there" if e.errno == errno.ENOSPC else "check the directory's owner and space"
        raise ImageError(f"cannot publish {source} as {final}: {e.strerror}; {fix}") from None
    finally:
        if own:
            os.close(src_fd)
    return copied


def _copy_sparse(src: int, dst: int, name: Path, say: Say) -> int:
    """Copy the data regions of src (holes stay holes), saying how far a long copy has got."""
    size = os.fstat(src).st_size
    copied = 0
    last_said = time.monotonic()
    for start, end in data_regions(src):
        while start < end:
            chunk = os.pread(src, min(_CHUNK, end - start), start)
            if not chunk:
                break
            os.pwrite(dst, chunk, start)
            start += len(chunk)
            copied += len(chunk)
            if time.monotonic() - last_said >= PROGRESS_EVERY_S:
                say(f"publishing {name.name}: {start * 100 // size}% ({start >> 20} of {size >> 20} MiB)")
                last_said = time.monotonic()
    os.ftruncate(dst, size)
    return copied


def _sync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

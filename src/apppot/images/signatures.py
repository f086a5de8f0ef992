"""Signed images: `apppot image sign` and `apppot image verify`, and the site policy `apppot start` obeys.

What is signed is the image's record, byte for byte (NAME-ID.json, which holds the image's content id,
its recipe id and what went into it), with `ssh-keygen -Y sign` in the namespace "apppot-image". The
signature is ssh-keygen's own armored SSHSIG, kept beside the record as NAME-ID.json.sig (the name
ssh-keygen itself gives the signature of NAME-ID.json). An image is trusted when the signature is good
for a principal of an allowed-signers file (ssh-keygen(1), ALLOWED SIGNERS) and the image's bytes are
its record's content id: a changed image and a changed record both fail. The tiny default appliance
and an image file without its record cannot be signed: there is no record to sign.

A site requires signed images with a file `allowed_signers` in a site image directory (the first of
$APPPOT_IMAGE_PATH that has one) and/or APPPOT_TRUSTED_SIGNERS=FILE; when both are there, an image must
satisfy both. The policy binds `apppot start` as the environment it runs in sets it up: AppPot runs as the
user, who can always boot a kernel of their own without it, so it guards against images changed by anyone
other than the user running the job, and against accidents; never against that user.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from apppot.bounded import read_at_most
from apppot.errors import ImageError, UsageError
from apppot.images.store import RECORD_SUFFIX, SIGNATURE_SUFFIX

if TYPE_CHECKING:
    from apppot.images import sshsig

TRUSTED_SIGNERS_ENV = "APPPOT_TRUSTED_SIGNERS"
SITE_SIGNERS = "allowed_signers"  # in a site image directory: the site's policy
RECORD_LIMIT = 4 << 20  # a record lists an appliance's packages: tens of KiB
SIGNERS_LIMIT = 1 << 20
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class SignatureError(ImageError):
    """An image that is not signed by a trusted signer: unsigned, signed by another key, or not matching
    its signature (`apppot image verify` exits 1; `apppot start` under a site policy 125)."""


def record_path(image: Path) -> Path:
    return image.with_suffix(RECORD_SUFFIX)


def signature_path(image: Path) -> Path:
    return image.with_suffix(SIGNATURE_SUFFIX)


class Policy(NamedTuple):
    """The allowed-signers file a site requires images to be signed against, and where that requirement comes from."""

    signers: Path
    source: str  # for messages: "APPPOT_TRUSTED_SIGNERS" or "the site image directory DIR"


def choose_policy(env_value: str | None, site_files: Iterable[Path]) -> tuple[Policy, ...]:
    """The policies (pure) an image must all satisfy: the first site image directory's allowed_signers among
    ``site_files`` (those that exist, in search order), and APPPOT_TRUSTED_SIGNERS when set and not empty. The
    environment adds a requirement to a site's file, never replaces it. Empty: no policy."""
    policies = [Policy(path, f"the site image directory {path.parent}") for path in site_files][:1]
    if env_value:
        if not os.path.isabs(env_value):
            raise UsageError(
                f"{TRUSTED_SIGNERS_ENV}={env_value!r} is a relative path; give the allowed-signers file's absolute path"
            )
        policies.append(Policy(Path(env_value), TRUSTED_SIGNERS_ENV))
    return tuple(policies)


def site_policies(environ: Mapping[str, str] = os.environ) -> tuple[Policy, ...]:
    """The policies of this host and environment. A site directory that holds an allowed_signers file must be safe
    (sites.check_directory): a policy others could change is refused, not ignored."""
    from apppot.images import sites

    def site_files() -> Iterator[Path]:
        for directory in sites.site_dirs():
            candidate = directory / SITE_SIGNERS
            if os.path.lexists(candidate):
                sites.check_directory(directory)
                yield candidate
                return

    return choose_policy(environ.get(TRUSTED_SIGNERS_ENV), site_files())


class Verified(NamedTuple):
    """An image whose signature is good for a trusted signer and whose bytes are its record's content id."""

    image: Path
    record: Path
    signature: Path
    signer: str  # the allowed-signers principal whose key made the signature
    key: str  # that key's fingerprint (SHA256:...)
    content_id: str
    signers: Path  # the allowed-signers file it was checked against


def verify(image: Path, signers: Path, name: str | None = None) -> Verified:
    """Check image against the allowed-signers file. SignatureError when it is not trusted (no record, no or a
    damaged signature, a key the file does not allow, a signature that is not its record's, bytes that are not
    its content id); other AppPotErrors when it cannot be checked (the signers file, ssh-keygen)."""
    from apppot.images.verify import open_image

    _require_image(image)
    fd = open_image(image)
    try:
        return verify_open(image, fd, signers, name)
    finally:
        os.close(fd)


def verify_open(image: Path, fd: int, signers: Path, name: str | None = None) -> Verified:
    """verify, for the image open as ``fd`` (the file a job boots): the record is read once, its signature
    checked over those very bytes, and the content id they give must be the open file's."""
    from apppot.images import sshsig

    label = _label(image, name)
    allowed = read_signers(signers)
    record_file, record = _read_record(image, label)
    content_id = _content_id(record, record_file, label)
    sig_file = signature_path(image)
    found = _read_bounded(sig_file, sshsig.SIGNATURE_LIMIT, f"the signature of {label}")
    if found is None:
        raise SignatureError(
            f"{label} is not signed (no {sig_file.name} beside it); its maker signs it "
            f"(apppot image sign {name or image} --key KEY) and has the key added to {signers}"
        )
    armored = found[0]
    signature = _parse(armored, sig_file, label)
    signer = _signer(allowed, armored, record, signature, signers, label, record_file)
    from apppot.images.verify import check_open_file

    try:
        check_open_file(fd, image, content_id)
    except ImageError as e:
        raise SignatureError(str(e)) from None
    return Verified(image, record_file, sig_file, signer, signature.fingerprint, content_id, signers)


def enforce_policy(image: Path, fd: int | None, environ: Mapping[str, str] = os.environ) -> list[Verified]:
    """What `apppot start` calls once the image is open (``fd``, the file it boots): under the site's policies,
    an image not signed by a signer of each is refused (SignatureError, one line naming the image, the fault, the
    fix and the policy); without a policy, nothing is checked (an empty list)."""
    policies = site_policies(environ)
    if not policies:
        return []
    if fd is None:  # prepare opens the image whenever a policy applies (selection.open_verified)
        raise ImageError(f"image {image} was not opened for the site's signature check; report this to AppPot's authors")
    checked = []
    for policy in policies:
        try:
            checked.append(verify_open(image, fd, policy.signers))
        except SignatureError as e:
            raise SignatureError(f"{e} (the site requires signed images: {policy.source})") from None
    return checked


class Signed(NamedTuple):
    image: Path
    signature: Path
    identity: str
    key: str  # fingerprint
    allowed_signers: str  # the line that trusts this key for AppPot images, for the site's allowed_signers


def sign(image: Path, key: Path, identity: str, name: str | None = None) -> Signed:
    """Sign the image's record with ssh-keygen and key, after checking the image is what its record says;
    the signature goes beside the record (NAME-ID.json.sig), replacing any earlier one."""
    from apppot.images import sshsig, store
    from apppot.images.verify import check_content

    label = _label(image, name)
    _require_image(image)
    if not identity or any(c.isspace() or c in '",' for c in identity) or identity.startswith("#"):
        raise UsageError(f"--identity {identity!r}: give a name without blanks, quotes or commas, e.g. alice@example.org")
    record_file, record = _read_record(image, label, for_signing=True)
    check_content(image, _content_id(record, record_file, label))  # a changed image is refused, not signed
    armored = _run_sign(key, record)
    signature = _parse(armored, key, f"the signature ssh-keygen made with {key}")
    target = signature_path(image)
    try:
        store.replace_file(target, armored)
        owner = store.cache_owner(target.parent)  # root signing a user's image: the user keeps it
        if owner is not None:
            os.chown(target, *owner, follow_symlinks=False)
    except OSError as e:
        raise ImageError(
            f"cannot write the signature {target}: {e.strerror}; sign the image where you can write it "
            "(your cache) and publish it from there (apppot image publish)"
        ) from None
    return Signed(image, target, identity, signature.fingerprint, sshsig.allowed_signers_line(identity, signature))


def default_identity() -> str:
    """USER@HOST: the name a signer is known by in an allowed-signers file, unless --identity says otherwise."""
    import pwd
    import socket

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return f"{user}@{socket.gethostname()}"


# --- reading what others may have written ------------------------------------------------------


def _require_image(image: Path) -> None:
    if not os.path.isfile(image):
        raise ImageError(f"no image file {image}; give an image name from 'apppot image list', or an image file")


def _label(image: Path, name: str | None) -> str:
    return f"image {name} ({image})" if name else f"image {image}"


def _read_bounded(
    path: Path, limit: int, what: str, error: type[ImageError] = SignatureError
) -> tuple[bytes, os.stat_result] | None:
    """A regular file's bytes (at most limit) and its status; None when it does not exist. A link, FIFO,
    device, directory or bigger file is ``error``: never followed, never waited on, never read whole."""
    from apppot.userpath import kind

    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what}, {path}, is {kind(mode)}, not a file; remove it, or give the file itself")
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise error(f"cannot read {what}, {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        data = read_at_most(fd, limit)
    except OSError as e:
        raise error(f"cannot read {what}, {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if data is None:
        raise error(f"{what}, {path}, is over {limit} bytes, so it is not one; remove it, or give the right file")
    return data, st


def _read_record(image: Path, label: str, for_signing: bool = False) -> tuple[Path, bytes]:
    record_file = record_path(image)
    found = _read_bounded(record_file, RECORD_LIMIT, f"the record of {label}")
    if found is None:
        what = "the tiny default appliance" if image.name.startswith("tiny-") else label
        fix = (
            "sign an appliance built from a recipe (apppot image build RECIPE.toml)"
            if for_signing
            else "use an appliance built from a recipe and signed (apppot image sign NAME --key KEY), "
            "by name or with its record beside it"
        )
        error = ImageError if for_signing else SignatureError
        raise error(f"{what} has no record ({record_file.name}), so it cannot be signed: {fix}")
    return record_file, found[0]


def _content_id(record: bytes, record_file: Path, label: str) -> str:
    import json

    try:
        value = json.loads(record).get("content_id")
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise SignatureError(f"the record of {label}, {record_file}, is damaged (no content id); rebuild the image")
    return value


def _parse(armored: bytes, where: Path, label: str) -> sshsig.SshSignature:
    from apppot.images import sshsig

    try:
        signature = sshsig.parse(armored)
    except sshsig.DamagedSignature as e:
        raise SignatureError(f"{where}, the signature of {label}, is damaged ({e}); its maker signs it again") from None
    if signature.namespace != sshsig.NAMESPACE:
        raise SignatureError(
            f"{where}, the signature of {label}, was made for {signature.namespace!r}, not for AppPot images "
            f"({sshsig.NAMESPACE!r}); sign the image with apppot image sign"
        )
    return signature


def read_signers(path: Path) -> bytes:
    """An allowed-signers file: a regular file no one but its owner (root, you, or its directory's owner) may
    change, since whoever can write it decides which images run. Bad: ImageError (the check cannot be made)."""
    what = "the allowed-signers file"
    found = _read_bounded(path, SIGNERS_LIMIT, what, ImageError)
    if found is None:
        raise ImageError(f"{what} {path} does not exist; give an allowed-signers file ({TRUSTED_SIGNERS_ENV}, --signers)")
    data, st = found
    if st.st_mode & _WRITABLE_BY_OTHERS:
        raise ImageError(
            f"{what} {path} is writable by others than its owner (mode {stat.S_IMODE(st.st_mode):04o}), "
            "who could trust any key; make it chmod go-w"
        )
    if st.st_uid not in {0, os.geteuid(), os.stat(path.parent).st_uid}:
        raise ImageError(f"{what} {path} belongs to uid {st.st_uid}, who could trust any key; make it root's or yours")
    return data


# --- running ssh-keygen, on private copies of what it reads ---------------------------------------


def _signer(
    allowed: bytes, armored: bytes, record: bytes, signature: sshsig.SshSignature, signers: Path, label: str, record_file: Path
) -> str:
    """The principal whose good signature this is. ssh-keygen reads copies in a private directory: what it checks
    is what AppPot read, whoever changes the files meanwhile."""
    import tempfile

    from apppot.images import sshsig
    from apppot.proc import run

    with tempfile.TemporaryDirectory(prefix="apppot-verify-") as private:
        signers_copy = Path(private) / "allowed_signers"
        sig_copy = Path(private) / "record.sig"
        signers_copy.write_bytes(allowed)
        sig_copy.write_bytes(armored)
        found = run(sshsig.find_principals_argv(signers_copy, sig_copy), check=False, package=sshsig.KEYGEN_PACKAGE)
        principals = [p for line in found.stdout.decode(errors="replace").splitlines() for p in line.split(",") if p]
        if found.returncode != 0 or not principals:
            raise SignatureError(
                f"{label} is signed by the key {signature.fingerprint}, which {signers} does not trust; "
                "use an image signed by a trusted signer, or have that key added to the file"
            )
        for principal in principals:
            checked = run(sshsig.verify_argv(signers_copy, principal, sig_copy), input=record, check=False)
            if checked.returncode == 0:
                return principal
    raise SignatureError(
        f"the signature of {label} is not a good signature of its record {record_file.name} by {principals[0]} "
        f"(key {signature.fingerprint}): the record was changed or rebuilt after signing; its maker signs it again"
    )


def _run_sign(key: Path, record: bytes) -> bytes:
    import tempfile

    from apppot.errors import HostError
    from apppot.images import sshsig
    from apppot.proc import run

    if not os.path.lexists(key):
        raise UsageError(f"--key {key}: no such file; give your private key, or the public key of one ssh-agent holds")
    with tempfile.TemporaryDirectory(prefix="apppot-sign-") as private:
        data = Path(private) / "record"
        data.write_bytes(record)
        done = run(sshsig.sign_argv(key, data), check=False, package=sshsig.KEYGEN_PACKAGE)
        said = done.stderr.decode(errors="replace").strip().splitlines()
        last = said[-1] if said else f"status {done.returncode}"
        if done.returncode != 0:
            if "passphrase" in last and not _has_terminal():
                raise HostError(
                    f"the key {key} needs its passphrase and there is no terminal to ask it on: "
                    f"add it to ssh-agent (ssh-add {key}) and sign again, or sign from a terminal"
                )
            fix = "give a private key, or the .pub of a key ssh-agent holds"
            raise HostError(f"ssh-keygen could not sign with {key}: {last}; {fix}")
        made = _read_bounded(Path(private) / "record.sig", sshsig.SIGNATURE_LIMIT, "the signature ssh-keygen made")
    if made is None:
        raise HostError(f"ssh-keygen signed with {key} but wrote no signature: {last}")
    return made[0]


def _has_terminal() -> bool:
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
    except OSError:
        return False
    return True

"""`apppot image sign` and `apppot image verify` (apppot.images.signatures)."""

from __future__ import annotations

import argparse
from pathlib import Path

from apppot.cli.common import print_record
from apppot.errors import UsageError
from apppot.say import say_stderr as say

EXIT_NOT_TRUSTED = 1  # `apppot image verify`: the image is not signed by a trusted signer (125: not checked)


def _image(text: str) -> tuple[Path, str | None]:
    """The image an argument names (a name, sha256:PREFIX or a file, as apppot start takes them), and its
    name when it was given by name or content id."""
    from apppot.images.selection import ImageSource, choose_image

    chosen = choose_image(text)
    named = chosen.source is not ImageSource.PATH and chosen.stored is not None
    return chosen.path, (chosen.stored.name if named and chosen.stored is not None else None)


def image_sign(ns: argparse.Namespace) -> int:
    from apppot.images import signatures

    path, name = _image(ns.image)
    done = signatures.sign(path, ns.key, ns.identity or signatures.default_identity(), name)
    if ns.json:
        print_record({k: str(v) if isinstance(v, Path) else v for k, v in done._asdict().items()}, True)
        return 0
    # The line a site pastes goes alone to stdout (apppot image sign ... >> allowed_signers works); the rest is talk.
    print(done.allowed_signers)
    where = f"{signatures.TRUSTED_SIGNERS_ENV} or a site image directory's {signatures.SITE_SIGNERS}"
    say(f"signed {done.image} as {done.identity} (key {done.key}): {done.signature}")
    say(f"a site trusts your signatures with the line above on stdout, added to its allowed-signers file ({where})")
    return 0


def image_verify(ns: argparse.Namespace) -> int:
    from apppot.images import signatures
    from apppot.images.signatures import SignatureError

    every = [ns.signers] if ns.signers is not None else [policy.signers for policy in signatures.site_policies()]
    if not every:
        raise UsageError(
            f"no allowed-signers file to verify against: give --signers FILE, or set {signatures.TRUSTED_SIGNERS_ENV}, "
            f"or put one named {signatures.SITE_SIGNERS} in a site image directory"
        )
    path, name = _image(ns.image)
    signers = every[0]
    try:
        for signers in every:  # the site's file and APPPOT_TRUSTED_SIGNERS: both, as apppot start requires
            good = signatures.verify(path, signers, name)
    except SignatureError as e:
        if ns.json:
            print_record({"image": str(path), "trusted": False, "problem": str(e), "signers": str(signers)}, True)
        say(f"error: {e}")
        return EXIT_NOT_TRUSTED
    record = {"trusted": True, **{k: str(v) if isinstance(v, Path) else v for k, v in good._asdict().items()}}
    if ns.json:
        print_record(record, True)
    else:
        print(f"{name or path}: good signature by {good.signer} (key {good.key}), allowed by {signers}")
        print(f"content id {good.content_id} (the image's bytes, as its signed record says)")
    return 0

"""`apppot image`, `apppot changes` and `apppot kernel`: what AppPot keeps in its cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from apppot.cli.common import human, parser_class, print_record, print_table
from apppot.errors import UsageError
from apppot.say import say_stderr as say

if TYPE_CHECKING:
    import argparse

    from apppot.images.store import StoredImage


def cmd_image(argv: Sequence[str]) -> int:
    p = parser_class()(prog="apppot image", description="Appliance images.")
    sub = p.add_subparsers(dest="action", required=True)
    build = sub.add_parser(
        "build",
        help="build an appliance from a recipe (TOML) into the cache",
        description="Build an appliance from a recipe (TOML) into the cache, as root, with mmdebstrap. Two builds of a "
        "recipe against one mirror state give the same image, byte for byte. Every file's time is at most the build's "
        "time, SOURCE_DATE_EPOCH: from the environment if set, else from the recipe's lock, else the date of the "
        "suite's Release file on the mirror. A lock (NAME.lock beside NAME.toml, written by --lock) is used whenever "
        "it is there: every package is installed at its locked version.",
    )
    build.add_argument("recipe", type=Path, help="the recipe file, e.g. examples/debian-dev.toml")
    build.add_argument("--force", action="store_true", help="rebuild even if built from the same inputs")
    build.add_argument(
        "--lock",
        action="store_true",
        help="resolve the packages against the mirror afresh (ignoring the recipe's lock) and write the exact versions "
        "installed as the recipe's lock, NAME.lock beside it; a build of a recipe with a lock installs exactly those",
    )
    build.add_argument("--quiet", action="store_true", help="no progress lines")
    build.add_argument("--json", action="store_true", help="machine-readable output")
    tiny_build = sub.add_parser("build-tiny", help="build the tiny default appliance into the cache")
    tiny_build.add_argument("--force", action="store_true", help="rebuild even if cached")
    tiny_build.add_argument("--json", action="store_true", help="machine-readable output")
    publish = sub.add_parser(
        "publish",
        help="copy an image, its record and your kernel into a site image directory, read-only for every user",
        description="Copy the image NAME (as --image NAME finds it), its record and the UML kernel apppot start "
        "would use into a site image directory, where every user's --image NAME finds it, read-only. "
        "Each file goes through a temporary file and a rename: running jobs keep what they have.",
    )
    publish.add_argument("name", help="an image name from 'apppot image list'")
    publish.add_argument(
        "directory",
        nargs="?",
        type=Path,
        help="the site image directory (default: the first of APPPOT_IMAGE_PATH; unset: /var/lib/apppot/images)",
    )
    publish.add_argument("--force", action="store_true", help="replace a different image (or kernel) of that name there")
    publish.add_argument("--kernel", metavar="PATH", help="publish this UML kernel (default: the one apppot start uses)")
    publish.add_argument("--no-kernel", action="store_true", help="publish the image only")
    publish.add_argument("--quiet", action="store_true", help="no progress lines")
    publish.add_argument("--json", action="store_true", help="machine-readable output")
    _add_signing(sub)
    listing = sub.add_parser("list", help="the images in the cache, then in the site image directories: names, sizes, ids")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    remove = sub.add_parser("remove", help="remove the images built under a name from the cache")
    remove.add_argument("name", help="an image name from 'apppot image list'")
    remove.add_argument("--old", action="store_true", help="keep the newest, remove the older ones")
    remove.add_argument("--json", action="store_true", help="machine-readable output")
    info = sub.add_parser("info", help="an image's recipe, ids, agent and size")
    info.add_argument("image", help="an image name from the cache, sha256:PREFIX of its content id, or an image file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    export = sub.add_parser("export", help="write an image as a disk any hypervisor boots by itself (no AppPot needed)")
    export.add_argument("image", help="an image name from the cache, or an image file")
    export.add_argument("-o", "--output", type=Path, required=True, help="the disk file to write")
    export.add_argument(
        "--format",
        choices=["qcow2", "vmdk", "vdi", "raw"],
        help="disk format (default: from the -o suffix, .img meaning raw): qcow2 for QEMU/KVM and OpenStack, "
        "vmdk for VMware and VirtualBox, vdi for VirtualBox, raw for Xen",
    )
    export.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    from apppot.images import ext4, store, tiny

    if ns.action == "export":
        from apppot.cli import vm as cli_vm

        return cli_vm.image_export(ns, say, print_record)
    if ns.action == "publish":
        from apppot.images import publish as publishing

        done = publishing.publish(
            ns.name,
            ns.directory,
            force=ns.force,
            kernel=ns.kernel,
            with_kernel=not ns.no_kernel,
            say=(lambda _: None) if ns.quiet else say,
        )
        print_record({k: str(v) if isinstance(v, Path) else v for k, v in done._asdict().items()}, ns.json)
        return 0
    if ns.action in ("sign", "verify"):
        from apppot.cli import signing

        return signing.image_sign(ns) if ns.action == "sign" else signing.image_verify(ns)
    if ns.action == "build":
        from apppot.images import debian, recipe

        parsed = recipe.parse_recipe(ns.recipe, with_lock=not ns.lock)  # --lock: the old lock, even a broken one, is replaced
        built = debian.build(parsed, force=ns.force, quiet=ns.quiet or ns.json, relock=ns.lock, say=say)
        record: dict[str, object] = {"path": str(built.path), "reused": built.reused, **built.record._asdict()}
        if built.lock is not None:
            record["lock"] = str(built.lock)
    elif ns.action == "build-tiny":
        made = tiny.build(force=ns.force)
        record = {"name": made.name, "path": str(made.path), "id": tiny.image_id(made.path)}
    elif ns.action == "remove":
        removed, kept = store.remove(ns.name, keep_newest=ns.old)
        if ns.json:
            import json

            print(json.dumps({"removed": [{"path": str(p), "bytes": n} for p, n in removed], "kept": [str(p) for p in kept]}))
        elif not removed:
            print(f"nothing to remove: the cache holds one build of {ns.name}, {', '.join(map(str, kept))}")
        for path, used in [] if ns.json else removed:
            print(f"removed {path} ({human(used)})")
        return 0
    elif ns.action == "list":
        rows = [_image_row(image) for image in store.all_images()]
        if ns.json:
            import json

            print(json.dumps(rows))
        else:
            print_table(rows, ["name", "id", "size", "used", "built", "signed", "where", "path"])
        return 0
    else:
        from apppot.images import selection, verify

        path = selection.choose_image(ns.image).path  # a name, sha256:PREFIX or a file, as apppot start takes them
        stored = next((i for i in store.all_images() if i.path.resolve() == path.resolve()), None)
        record = _image_row(stored) if stored else {"path": str(path)}
        if not stored:
            content_id = verify.content_id(path)
            record |= {"id": content_id[:16], "content_id": content_id}
        record |= {"uuid": ext4.filesystem_uuid(path)}
    print_record(record if ns.json else _for_people(record), ns.json)
    return 0


def _for_people(record: dict[str, object]) -> dict[str, object]:
    """A build or info record as a person reads it: the hundreds of installed package versions counted, not listed."""
    installed = record.get("installed")
    if isinstance(installed, list) and installed:
        return record | {"installed": f"{len(installed)} packages with their versions (--json lists them)"}
    return record


SIGNED_IMAGE_HELP = "an image name or sha256:PREFIX from 'apppot image list', or an image file with its record beside it"


def _add_signing(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sign = sub.add_parser(
        "sign",
        help="sign a built image's record with your SSH key (ssh-keygen -Y sign), beside it as NAME-ID.json.sig",
        description="Sign the record of the image NAME (NAME-ID.json: its content id, recipe id and packages) with "
        "ssh-keygen -Y sign in the namespace apppot-image, after checking the image's bytes are that content id. "
        "The signature is written beside the record as NAME-ID.json.sig; 'apppot image publish' carries it along. "
        "Only appliances built from a recipe can be signed: the tiny default appliance has no record. "
        "Prints the allowed-signers line a site adds to trust your key.",
    )
    sign.add_argument("image", metavar="NAME", help=SIGNED_IMAGE_HELP)
    sign.add_argument(
        "--key",
        type=Path,
        required=True,
        help="your private key (ssh-keygen asks its passphrase on the terminal), or the .pub of a key ssh-agent holds",
    )
    sign.add_argument(
        "--identity",
        metavar="ID",
        help="the name you sign as, in the allowed-signers line printed (default: USER@HOST; no blanks, quotes "
        "or commas); an SSH signature holds only the key, the site's file names who it is",
    )
    sign.add_argument("--json", action="store_true", help="machine-readable output")
    verify = sub.add_parser(
        "verify",
        help="check an image's signature against an allowed-signers file, and its bytes against its record",
        description="Check that the image's record carries a good signature (ssh-keygen -Y verify, namespace "
        "apppot-image) by a key of the allowed-signers file, and that the image's bytes are the record's content "
        "id; print who signed it. Exit status: 0 trusted; 1 not trusted (unsigned, no record, a key the file does "
        "not allow, a signature or image that does not match the record, a damaged signature); 125 the check "
        "could not be made (no or an unsafe allowed-signers file, no ssh-keygen, no such image).",
    )
    verify.add_argument("image", metavar="NAME", help=SIGNED_IMAGE_HELP)
    verify.add_argument(
        "--signers",
        type=Path,
        metavar="FILE",
        help="the allowed-signers file (ssh-keygen(1), ALLOWED SIGNERS; default: the site policy: allowed_signers "
        "in the first site image directory that has one and $APPPOT_TRUSTED_SIGNERS, both when both are there)",
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")


def _image_row(image: StoredImage) -> dict[str, object]:
    from apppot.images import selection, store

    st = image.path.stat()
    # What `--image sha256:` matches: the record's id; the tiny appliance's as built (else its bytes').
    content_id = selection.stored_content_id(image)
    row: dict[str, object] = {
        "name": image.record.name if image.record else "tiny",
        "id": content_id[:16],
        "size": human(image.record.size_bytes if image.record else st.st_size),
        "used": human(st.st_blocks * 512),
        "built": (image.record.built or None) if image.record else _tiny_built(image),
        # A signature beside the record (apppot image verify says by whom, and whether a policy trusts it).
        "signed": image.record is not None and image.path.with_suffix(store.SIGNATURE_SUFFIX).is_file(),
        "where": "cache" if image.site is None else f"site {image.site}",
        "path": str(image.path),
    }
    row["content_id"] = content_id
    if image.record:
        row |= image.record._asdict()
    return row


def _tiny_built(image: StoredImage) -> str | None:
    """The tiny appliance has no record: its files carry a fixed mtime (same bytes, same file), so when
    build-tiny made it in the cache shows in the inode's change time (as store orders them). A site's
    copy has the time the copy was made: when it was built is unknown there."""
    from datetime import UTC, datetime

    if image.site is not None:
        return None
    return datetime.fromtimestamp(image.path.stat().st_ctime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # as records write it


def cmd_changes(argv: Sequence[str]) -> int:
    p = parser_class()(prog="apppot changes", description="Changes archives made by apppot-snap changes.")
    sub = p.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="what an archive adds, modifies and deletes, and the base it needs")
    show.add_argument("archive", type=Path)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    from apppot import snap

    try:
        info, members = snap.check_archive(str(ns.archive))
    except snap.SnapError as e:
        raise UsageError(str(e)) from None
    if ns.json:
        import json

        print(json.dumps({**info._asdict(), "members": len(members), "bytes": ns.archive.stat().st_size}))
        return 0
    print(f"archive: {ns.archive} ({ns.archive.stat().st_size} bytes)")
    print(f"base: {info.base}")
    print(f"made: {info.created} by {info.tool}")
    for label, paths in (("adds", info.added), ("modifies", info.modified), ("deletes", info.deleted)):
        print(f"{label} ({len(paths)}):")
        for path in paths:
            print(f"  {path}")
    return 0


def cmd_kernel(argv: Sequence[str]) -> int:
    p = parser_class()(prog="apppot kernel", description="AppPot's own User-mode Linux kernel.")
    sub = p.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build AppPot's kernel from Debian's kernel source into the cache (~9 min on 2 cores)")
    build.add_argument("--force", action="store_true", help="rebuild even if this version and config are built")
    build.add_argument("--jobs", type=int, metavar="N", help="parallel compile jobs (default: number of CPUs)")
    build.add_argument("--json", action="store_true", help="machine-readable output")
    info = sub.add_parser("info", help="the kernel `apppot start` would use, and what it can do on this host")
    info.add_argument("--kernel", metavar="PATH", help="this kernel instead")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    if ns.action == "build":
        from apppot import kernel_build

        built = kernel_build.build(force=ns.force, jobs=ns.jobs, say=say)
        record: dict[str, object] = {"path": str(built.directory / "linux"), "reused": built.reused, **built.record._asdict()}
    else:
        from apppot.kernel import KernelRecord, find_kernel, kernel_release, kernel_traits
        from apppot.network import choose_network

        found = find_kernel(ns.kernel)
        own = KernelRecord.read(found.path)
        traits = kernel_traits(found.path, say)
        net = choose_network(traits, None)
        record = {
            "path": str(found.path),
            "chosen_by": found.source.value,
            **(own._asdict() if own else {"release": kernel_release(found.path), "source_package": "user-mode-linux (Debian)"}),
            "seccomp_supported": traits.seccomp_option,
            "seccomp_on_this_host": traits.seccomp_works,
            "lpj": traits.lpj,
            # What `apppot start` would pick here, not only what the kernel could drive.
            "network": "vde slirp plugin" if net else "none",  # a NAT helper outside UML's namespace
        }
    print_record(record, ns.json)
    return 0

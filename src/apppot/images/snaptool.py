"""apppot-snap as images carry it: the apppot.snap package as one executable zipapp (python3 runs a
zip whose __main__.py starts the program), byte for byte the same for the same sources."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

from apppot import snap

SHEBANG = b"#!/usr/bin/python3\n"
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)
# Inside the zip: the package under its own name, so the host's imports and the image's are one code.
_MAIN = b"import sys\n\nfrom apppot.snap.cli import run\n\nsys.exit(run())\n"


def _sources() -> list[tuple[str, bytes]]:
    package = Path(snap.__file__).parent
    files = [("__main__.py", _MAIN), ("apppot/__init__.py", b"")]
    files += [(f"apppot/snap/{p.name}", p.read_bytes()) for p in sorted(package.glob("*.py"))]
    return files


def digest() -> bytes:
    """What decides the tool's bytes (for the image's recipe id)."""
    h = hashlib.sha256()
    for name, data in _sources():
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.digest()


def build(target: Path) -> None:
    """Write the tool to target, executable."""
    with open(target, "wb") as f:
        f.write(SHEBANG)
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in _sources():
                info = zipfile.ZipInfo(name, _FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                z.writestr(info, data)
    os.chmod(target, 0o755)

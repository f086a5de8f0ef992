"""Finding the User-mode Linux kernel and what it needs from the host."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from apppot.errors import HostError
from apppot.proc import run

KERNEL_ENV = "APPPOT_KERNEL"
MISSING_KERNEL = (
    "no User-mode Linux kernel found: install Debian's user-mode-linux package "
    "(sudo apt-get install user-mode-linux), or pass --kernel PATH"
)


def find_kernel(explicit: str | None) -> Path:
    """The UML kernel to run: --kernel, then $APPPOT_KERNEL, then `linux` on PATH."""
    for source, value in (("--kernel", explicit), (KERNEL_ENV, os.environ.get(KERNEL_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file() or not os.access(path, os.X_OK):
                raise HostError(f"the UML kernel {value} given by {source} is not an executable file; fix the path")
            return path.resolve()
    found = shutil.which("linux")
    if found is None:
        raise HostError(MISSING_KERNEL)
    return Path(found).resolve()


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries (and loader) a dynamically linked binary needs, from ldd."""
    result = run(["ldd", str(binary)], check=False)
    libs: list[Path] = []
    for line in result.stdout.decode(errors="replace").splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                libs.append(Path(target))
        elif parts and parts[0].startswith("/"):
            libs.append(Path(parts[0]))
    return libs

"""The copy of AppPot that every user's jobs on the test cluster run (site/ in its directory)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import apppot
from apppot.images import tiny
from apppot.kernel import find_kernel


def install_site(site: Path) -> Path:
    """A copy of this AppPot that every user's batch jobs can run: the package under site/lib, run by
    the system's Python 3 (this process's interpreter may live where other users cannot go, e.g. a
    Python under /root), and the kernel AppPot would use, under site/kernel. Readable by all, writable
    by its owner alone. Returns the launcher."""
    if site.exists():
        shutil.rmtree(site)
    package = Path(apppot.__file__).parent
    shutil.copytree(package, site / "lib" / "apppot", ignore=shutil.ignore_patterns("__pycache__"))
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    bin_dir = site / "bin"
    bin_dir.mkdir()
    for name, function in (("apppot", "entry"), ("apppot-start", "start_entry")):
        (bin_dir / name).write_text(
            f"#!{python}\n# AppPot for the test cluster's jobs (apppot testbed up)\nimport sys\n\n"
            f"sys.path.insert(0, {str(site / 'lib')!r})\nfrom apppot.cli import {function}\n\n{function}()\n"
        )
        (bin_dir / name).chmod(0o755)
    (site / "images").mkdir()
    shutil.copy2(tiny.build().path, site / "images" / "tiny.img")  # the CE's default image
    kernel = find_kernel(None).path
    (site / "kernel").mkdir()
    shutil.copy2(kernel, site / "kernel" / "linux")
    if (kernel.parent / "kernel.json").exists():  # AppPot's own kernel: its record goes along
        shutil.copy2(kernel.parent / "kernel.json", site / "kernel" / "kernel.json")
    for path in [site, *site.rglob("*")]:
        mode = path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0)
        path.chmod(mode & 0o755)
    return bin_dir / "apppot"

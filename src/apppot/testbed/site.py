"""The copy of AppPot that every user's jobs on the test cluster run (site/ in its directory)."""

from __future__ import annotations

import shutil
from pathlib import Path

from apppot.images import tiny
from apppot.install import install
from apppot.kernel import find_kernel


def install_site(site: Path) -> Path:
    """AppPot installed for every user's batch jobs, as a site installs it (apppot.install, `make install-site
    PREFIX=site`): run by the system's Python 3 (this process's interpreter may live where other users cannot
    go, e.g. a Python under /root); and the kernel AppPot would use, under site/kernel. Readable by all,
    writable by its owner alone. Returns the launcher."""
    if site.exists():
        shutil.rmtree(site)
    launcher = install(site)
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
    return launcher

#!/usr/bin/env python3
"""Install the Debian packages AppPot needs on this host (stdlib only; runs before AppPot is installed).

    python3 tools/host_setup.py            # what `apppot start` needs
    python3 tools/host_setup.py --test     # and what the test suite needs, plus its unprivileged test user

As root it uses apt-get directly, otherwise sudo; it never changes apt's sources.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys

RUNTIME = ["user-mode-linux", "slirp", "vdeplug", "libvdeplug-slirp", "e2fsprogs", "busybox-static", "bubblewrap"]
# What `apppot kernel build` needs to build AppPot's own kernel from Debian's source.
KERNEL_BUILD = ["build-essential", "bc", "bison", "flex", "libelf-dev", "libssl-dev", "xz-utils"]
# What `apppot image build` needs to build Debian appliances from recipes.
IMAGE_BUILD = ["mmdebstrap", "debian-archive-keyring"]
# The QEMU backend, image export (a partitioned disk booted by syslinux) and cloud seeds (ISO 9660);
# zstd for guest kernels whose modules are zstd-compressed.
VM = ["qemu-system-x86", "qemu-utils", "syslinux", "syslinux-common", "mtools", "dosfstools", "fdisk", "xorriso", "zstd"]
# glpk-utils: the application appliance's program, natively, to compare against; sudo: the README's
# root lines run as written (its secure_path is why they name "$(command -v apppot)"); slurm-wlm and munge:
# the test cluster; ARC's A-REX, clients and Python binding: the test CE, and its parser reads our xRSL.
TESTING = [
    "tmux",
    "shellcheck",
    "dash",
    "util-linux",
    "glpk-utils",
    "sudo",
    "slurm-wlm",
    "munge",
    "python3-nordugrid-arc",
    "nordugrid-arc-plugins-needed",
    "nordugrid-arc-arex",
    "nordugrid-arc-client",
    "nordugrid-arc-arcctl",
    "nordugrid-arc-plugins-arcrest",
]
TEST_USER = "apppot-test"
TEST_USER_2 = "apppot-test2"  # a second user: runs by name what the first published (site images)


def installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False)
    return result.stdout.strip() == "install ok installed"


def as_root(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return argv
    if shutil.which("sudo"):
        return ["sudo", *argv]
    sys.exit(f"host_setup: need root to run {' '.join(argv)}; ask your administrator to install it")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", action="store_true", help="also install what the tests need")
    args = parser.parse_args()
    missing = [p for p in RUNTIME + KERNEL_BUILD + IMAGE_BUILD + VM if not installed(p)]
    # The test daemons without what Debian recommends with them (e.g. an LDAP server for ARC).
    missing_test = [p for p in TESTING if args.test and not installed(p)]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if missing or missing_test:
        print(f"host_setup: installing {' '.join(missing + missing_test)}", flush=True)
        subprocess.run(as_root(["apt-get", "update", "-qq"]), check=True, env=env)
    if missing:
        subprocess.run(as_root(["apt-get", "install", "-y", "-qq", *missing]), check=True, env=env)
    if missing_test:
        subprocess.run(
            as_root(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing_test]), check=True, env=env
        )
    if args.test and os.geteuid() == 0:
        for user in (TEST_USER, TEST_USER_2):
            try:
                pwd.getpwnam(user)
            except KeyError:
                print(f"host_setup: adding the unprivileged test user {user}", flush=True)
                subprocess.run(["useradd", "--create-home", "--user-group", user], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

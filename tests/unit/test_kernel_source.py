"""Choosing the kernel source package, and AppPot's config fragment."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from apppot import kernel_config
from apppot.kernel_build import kernel_id
from apppot.kernel_source import SourcePackage, choose, compare_versions, parse_madison

MADISON = """\
linux-source-6.1 |  6.1.176-1 | http://deb.debian.org/debian bookworm/main amd64 Packages
linux-source-6.1 |  6.1.170-3 | http://deb.debian.org/debian bookworm/main amd64 Packages
linux-source-7.2 | 7.2.12-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main amd64 Packages
linux-source-7.2 | 7.2.9-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main amd64 Packages
linux-source-7.3 | 7.3.4-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main amd64 Packages
linux-source | 7.3.4-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main amd64 Packages
"""


def test_madison_lines_become_packages_and_the_metapackage_is_ignored() -> None:
    packages = parse_madison(MADISON)
    assert len(packages) == 5
    assert packages[2] == SourcePackage("linux-source-7.2", "7.2.12-1~bpo13+1", "trixie-backports")


def test_newest_seccomp_capable_series_wins() -> None:
    choice = choose(parse_madison(MADISON), own_suite="bookworm")
    assert choice is not None and not choice.fallback
    assert (choice.package.name, choice.package.version) == ("linux-source-7.3", "7.3.4-1~bpo13+1")
    assert choice.package.upstream == "7.3.4" and choice.package.seccomp


def test_within_a_series_the_newest_debian_version_wins_not_the_first_listed() -> None:
    packages = [
        SourcePackage("linux-source-7.2", "7.2.9-1~bpo13+1", "trixie-backports"),
        SourcePackage("linux-source-7.2", "7.2.12-1~bpo13+1", "trixie-backports"),
        SourcePackage("linux-source-7.2", "7.2.12-1~bpo13+2", "trixie-backports"),
    ]
    choice = choose(packages, own_suite="bookworm")
    assert choice is not None and choice.package.version == "7.2.12-1~bpo13+2"


def test_without_a_new_enough_source_the_own_suite_is_the_fallback() -> None:
    packages = [p for p in parse_madison(MADISON) if p.suite == "bookworm"]
    packages.append(SourcePackage("linux-source-6.12", "6.12.9-1~bpo12+1", "trixie-backports"))  # < 6.16: no seccomp
    choice = choose(packages, own_suite="bookworm")
    assert choice is not None and choice.fallback
    assert (choice.package.name, choice.package.version) == ("linux-source-6.1", "6.1.176-1")
    assert not choice.package.seccomp


def test_nothing_to_choose_is_none() -> None:
    assert choose([], own_suite="bookworm") is None


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ("7.2.12-1~bpo13+1", "7.2.9-1~bpo13+1", 1),
        ("1.0~rc1-1", "1.0-1", -1),
        ("1:0.1-1", "2.0-1", 1),
        ("6.1.176-1", "6.1.176-1", 0),
        ("1.0a-1", "1.0+-1", -1),
        ("1.0-1", "1.0a-1", -1),
        ("7.3.4-1~bpo13+1", "7.3.4-1", -1),
    ],
)
def test_debian_version_order(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


def test_kernel_identity_names_version_and_config() -> None:
    package = SourcePackage("linux-source-7.3", "7.3.4-1~bpo13+1", "trixie-backports")
    assert kernel_id(package, "ab" * 32) == "7.3.4-1_bpo13_1-abababababab"


def test_fragment_becomes_scripts_config_arguments_in_order() -> None:
    options = kernel_config.parse_fragment(
        '# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=12\nCONFIG_D="x y"\nCONFIG_E=m\n'
    )
    assert kernel_config.scripts_config_args(options) == [
        "--enable", "A", "--disable", "B", "--set-val", "C", "12", "--set-str", "D", "x y", "--module", "E",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        kernel_config.parse_fragment("CONFIG_A y\n")


def test_our_fragment_parses_and_its_hash_is_stable() -> None:
    options = kernel_config.parse_fragment(kernel_config.fragment_text().decode())
    names = {o.name for o in options}
    assert {"HOSTFS", "BLK_DEV_UBD", "UML_NET_VECTOR", "IP_PNP", "MODULES"} <= names
    assert kernel_config.config_hash() == kernel_config.config_hash(kernel_config.fragment_text())


def test_unmet_options_are_reported_but_unknown_ones_are_skipped() -> None:
    options = kernel_config.parse_fragment("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_OLD=y\nCONFIG_N=14\n")
    final = kernel_config.parse_dotconfig("CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=12\n")
    assert kernel_config.unmet(options, final, known={"A", "B", "N"}) == ["# CONFIG_B is not set", "CONFIG_N=14"]


def _kept_build() -> Path | None:
    from apppot.kernel import own_kernel

    kernel = own_kernel()
    return kernel.parent if kernel is not None and (kernel.parent / "scripts-config").exists() else None


def test_applying_the_fragment_with_the_kernels_own_script_is_idempotent(tmp_path: Path) -> None:
    """scripts/config (kept by `apppot kernel build`) on a defconfig-like file: twice gives what once gives."""
    build = _kept_build()
    if build is None:
        pytest.skip("AppPot's kernel is not built here: run 'apppot kernel build'")
    args = kernel_config.scripts_config_args(kernel_config.parse_fragment(kernel_config.fragment_text().decode()))
    start = "CONFIG_MODULES=y\nCONFIG_DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT=y\nCONFIG_LOG_BUF_SHIFT=17\n# CONFIG_HOSTFS is not set\n"
    config = tmp_path / ".config"
    config.write_text(start)
    results = []
    for _ in range(2):
        subprocess.run([str(build / "scripts-config"), "--file", str(config), *args], check=True)
        results.append(config.read_text())
    assert results[0] == results[1] != start
    # And the built kernel's final .config already holds everything the fragment asks of it.
    final = (build / "config").read_text()
    config.write_text(final)
    subprocess.run([str(build / "scripts-config"), "--file", str(config), *args], check=True)
    options = kernel_config.parse_fragment(kernel_config.fragment_text().decode())
    known = set(kernel_config.parse_dotconfig(final))
    assert kernel_config.unmet(options, kernel_config.parse_dotconfig(final), known) == []

"""The NAT helper's lifecycle, with the real vde_plug (no guest)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apppot.errors import HostError
from apppot.nat import NatHelper
from apppot.network import NetKind, Network, choose_qemu_network


@pytest.fixture
def net() -> Network:
    found = choose_qemu_network(None)
    if found is None:
        pytest.skip("vdeplug4's slirp plugin is not installed")
    return found


def test_the_helper_makes_its_switch_and_ends_when_stopped(net: Network, tmp_path: Path) -> None:
    with open(tmp_path / "log", "wb") as log:
        helper = NatHelper.start(net, tmp_path / "net", log.fileno())
    try:
        assert (tmp_path / "net" / "ctl").is_socket()
        assert helper.proc.poll() is None
    finally:
        helper.stop()
    assert helper.proc.returncode is not None
    helper.stop()  # twice is harmless


def test_a_helper_that_fails_at_start_is_one_clear_error(tmp_path: Path) -> None:
    broken = Network(NetKind.QEMU_VDE, Path("/bin/false"), tmp_path)
    with open(tmp_path / "log", "wb") as log, pytest.raises(HostError, match=r"ended with status 1 at start.*--no-net"):
        NatHelper.start(broken, tmp_path / "net", log.fileno())


def test_a_missing_helper_is_one_clear_error(tmp_path: Path) -> None:
    missing = Network(NetKind.QEMU_VDE, tmp_path / "no-vde_plug", tmp_path)
    with open(tmp_path / "log", "wb") as log, pytest.raises(HostError, match="cannot start the network helper"):
        NatHelper.start(missing, tmp_path / "net", log.fileno())
    assert not os.path.exists(tmp_path / "net")

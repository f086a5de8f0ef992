"""`apppot testbed up` that fails half-way: it stops what it had started, says so, and leaves no
daemon running. No UML boots; the Slurm daemons are real."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from apppot.testbed import daemons, slurm
from tests.conftest import APPPOT, open_to_all
from tests.integration.conftest import own_kernel_only

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("slurmctld") is None,
    reason="the Slurm test cluster needs root and slurm-wlm (make test installs them)",
)

uml_kernel = own_kernel_only  # the kernel the testbed copies for its jobs; none boots here


def ours(conf: Path) -> list[int]:
    """The PIDs of Slurm daemons still running with this configuration."""
    return [pid for program in ("slurmctld", "slurmd") for pid in daemons.processes_naming(program, 0, str(conf))]


def test_a_failed_up_stops_everything_it_started(tmp_path: Path, cache_home: Path) -> None:
    if daemons.listening(slurm.CONTROLLER_PORT) or daemons.listening(slurm.FIRST_NODE_PORT + 1):
        pytest.skip("a test cluster runs on this machine already")
    directory = tmp_path / "Bed-APPS"  # capitals too
    env = {**os.environ, "APPPOT_TESTBED_DIR": str(directory), "XDG_CACHE_HOME": str(cache_home)}
    munged_before = slurm.munge_running()
    with socket.socket() as taken:  # node n2's port: its slurmd cannot listen, the nodes never get idle
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", slurm.FIRST_NODE_PORT + 1))
        taken.listen()
        up = subprocess.run(
            [APPPOT, "testbed", "up", "--nodes", "2", "--timeout", "15"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    conf = directory / "etc" / "slurm.conf"
    try:
        assert up.returncode == 125, up.stderr
        message = up.stderr.strip().splitlines()
        assert len(message) == 1 and "did not become idle in 15 s" in message[0], up.stderr
        assert "stopped what it had started (" in message[0] and "slurmctld" in message[0], message
        assert ours(conf) == [], "Slurm daemons left running"
        assert not daemons.listening(slurm.CONTROLLER_PORT)
        assert slurm.munge_running() == munged_before  # stopped if it started it, else left alone
        assert not list((directory / "run").glob("*.pid")) and not (directory / "run" / "munged.ours").exists()
    finally:
        for pid in ours(conf):
            daemons.stop_pid(pid, "slurmctld", 0)
            daemons.stop_pid(pid, "slurmd", 0)
    open_to_all(directory)
    down = subprocess.run([APPPOT, "testbed", "down"], env=env, capture_output=True, text=True, check=False)
    assert down.returncode == 0 and "stopped nothing (no test cluster was running)" in down.stderr, down.stderr

"""The NAT helper of one job: started before the hypervisor, ended with the job.

It runs on the host, outside the hypervisor's network namespace (it is the guest's only way out), as
the user running AppPot, with a minimal environment. It gets SIGKILL when AppPot's thread that started
it ends, so it never outlives a job, even when AppPot itself is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from apppot.errors import HostError
from apppot.network import Network
from apppot.proc import parent_death_signal

READY_TIMEOUT_S = 10.0
STOP_GRACE_S = 1.0
SWITCH_CONTROL = "ctl"  # the socket a vde switch makes in its directory


class NatHelper:
    """A running `vde_plug switch://DIR slirp://...`."""

    def __init__(self, proc: subprocess.Popen[bytes], switch: Path) -> None:
        self.proc = proc
        self.switch = switch

    @classmethod
    def start(cls, net: Network, switch: Path, log_fd: int, verbose: bool = False) -> NatHelper:
        """Start the helper; returns once its switch takes connections. Its messages go to the console log."""
        argv = net.helper_argv(str(switch))
        if verbose:
            os.write(log_fd, f"apppot: running: {shlex.join(argv)}\n".encode())
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,  # a Ctrl-C at the terminal goes to AppPot, which ends it in order
                env={"PATH": "/usr/bin:/bin", "HOME": str(switch.parent)},
                preexec_fn=parent_death_signal(signal.SIGKILL),
            )
        except OSError as e:
            raise HostError(f"cannot start the network helper {argv[0]}: {e.strerror}") from e
        helper = cls(proc, switch)
        try:
            helper._wait_ready()
        except BaseException:
            helper.stop()
            raise
        return helper

    def _wait_ready(self) -> None:
        control = self.switch / SWITCH_CONTROL
        deadline = time.monotonic() + READY_TIMEOUT_S
        delay = 0.0005
        while not control.exists():
            if self.proc.poll() is not None:
                raise HostError(
                    f"the network helper vde_plug ended with status {self.proc.returncode} at start "
                    "(its message is in the console log, see --console-log); fix it, or use --no-net"
                )
            if time.monotonic() > deadline:
                raise HostError(f"the network helper did not make its switch in {READY_TIMEOUT_S:g} s; or use --no-net")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def stop(self) -> None:
        """End the helper (SIGTERM, then SIGKILL); idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

"""Whether KVM really works on this host: a probe guest must boot with it.

`/dev/kvm` answering the KVM_GET_API_VERSION ioctl proves nothing (on some VMs it
answers, but no guest boots). So the probe boots the tiny appliance under QEMU with
KVM and runs `true` in it, within PROBE_TIMEOUT_S. The result is cached per host,
QEMU binary, host kernel and guest kernel; `apppot doctor` shows it, and
`apppot doctor --reprobe` probes again.

Only a verdict is cached: a probe guest that ran `true` with KVM (works), or one that
QEMU started but that did not boot or finish with it (does not work). A probe that
could not be made (no guest kernel offline, no busybox for the tiny appliance) says
why without caching it, and a probe stopped by a signal stops AppPot.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

from apppot.backends.choice import KvmState
from apppot.backends.qemu import QEMU_PACKAGE, QEMU_SYSTEM
from apppot.errors import AppPotError, GuestDied, Interrupted
from apppot.hostcache import cached, file_identity
from apppot.proc import which
from apppot.say import Say

KVM_DEVICE = "/dev/kvm"
PROBE_TIMEOUT_S = 20.0


def precheck() -> KvmState | None:
    """A reason KVM cannot work, found without booting anything; None if a probe is needed."""
    if not os.path.exists(KVM_DEVICE):
        return KvmState(False, f"no {KVM_DEVICE} (no virtualisation extensions, or the kvm module is not loaded)")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return KvmState(False, f"{KVM_DEVICE} is not open to you: ask to be added to its group (usually kvm)")
    if which(QEMU_SYSTEM) is None:
        return KvmState(False, f"{QEMU_SYSTEM} is not installed (sudo apt-get install {QEMU_PACKAGE})")
    return None


def _key() -> list[str]:
    qemu = which(QEMU_SYSTEM)
    assert qemu is not None
    st = os.stat(KVM_DEVICE)
    from apppot import guest_kernel

    kernel = guest_kernel.installed()
    return [
        socket.gethostname(),
        os.uname().release,
        file_identity(Path(qemu)),
        f"{KVM_DEVICE}:{st.st_rdev}",
        kernel.release if kernel else "",
    ]


def state(say: Say, reprobe: bool = False) -> KvmState:
    """Whether a guest boots with KVM here: from the cache, else by booting one (once per host)."""
    early = precheck()
    if early is not None:
        return early
    from apppot import guest_kernel

    try:
        guest_kernel.find(say)  # the probe boots the guest kernel; fetch it before the key names it
    except AppPotError as e:
        return KvmState(False, f"not probed: no guest kernel to probe with ({e})")
    key = _key()
    if reprobe:
        key.append(f"probe at {time.time()}")
    try:
        result = cached("kvm-probe", key, lambda: _probe(say)._asdict())
    except _NoVerdict as e:
        return e.state
    return KvmState(bool(result["works"]), str(result["reason"]))


class _NoVerdict(Exception):
    """The probe could not be made for a reason that is not KVM's: said, never cached."""

    def __init__(self, state: KvmState) -> None:
        super().__init__(state.reason)
        self.state = state


def _probe(say: Say) -> KvmState:
    """Boot the tiny appliance with KVM and run `true`: the verdict, or _NoVerdict."""
    from apppot import runner
    from apppot.backends.choice import Backend, Decision
    from apppot.backends.qemu import Accel
    from apppot.prepare import prepare
    from apppot.spec import JobSpec

    say(f"probing KVM: booting a guest with it (at most {PROBE_TIMEOUT_S:g} s, once per host)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="apppot-kvm-probe-") as jobdir:
        spec = JobSpec(argv=("true",), jobdir=Path(jobdir), net=False, backend="qemu", kvm=True, mem_bytes=128 << 20)
        decision = Decision(Backend.QEMU, Accel.KVM, "KVM probe")
        quiet: Say = lambda _message: None  # noqa: E731
        try:
            job = runner.Job(prepare(spec, quiet, decision), quiet, deadline_s=PROBE_TIMEOUT_S)
            code = job.run()
        except GuestDied as e:  # QEMU ran, the guest did not boot or finish with KVM: a verdict
            return KvmState(False, f"a probe guest did not boot with KVM: {e}")
        except AppPotError as e:  # anything else kept the probe from being made
            raise _NoVerdict(KvmState(False, f"not probed: {e}")) from None
        if job.signal_received is not None:
            raise Interrupted(job.signal_received, "while probing KVM")
    took = time.monotonic() - started
    if code != 0:
        return KvmState(False, f"a probe guest under KVM ran `true` with status {code}")
    return KvmState(True, f"a probe guest booted with KVM and ran `true` in {took:.1f} s")

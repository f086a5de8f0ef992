"""`apppot start`: decide the backend, prepare the job for it, run it.

The KVM probe (apppot.kvm) boots a job of its own through prepare and the runner,
so the decision is made here, above all three.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from apppot.backends.choice import Decision, KvmState, decide, requested
from apppot.images.signatures import enforce_policy
from apppot.prepare import prepare
from apppot.runner import Job, guest_identity
from apppot.say import Say, say_stderr
from apppot.spec import JobSpec

if TYPE_CHECKING:
    from apppot.record import Recorder


def choose_backend(spec: JobSpec, say: Say) -> Decision:
    """--backend, $APPPOT_BACKEND, the config file, else UML; KVM probed where it matters."""
    backend, where = requested(spec.backend, os.environ)

    def probe() -> KvmState:
        from apppot import kvm  # only when QEMU may be used: it is not needed for UML

        return kvm.state(say)

    decision = decide(backend, where, spec.kvm, probe, uml_kernel=spec.kernel)
    if spec.verbose:
        say(f"backend: {decision.why}")
    return decision


def start(spec: JobSpec, say: Say = say_stderr) -> int:
    """Run one job; returns the exit code for `apppot start`."""
    if spec.record is not None:  # only then: a job without a record loads and measures nothing for one
        from apppot.record import Recorder

        return Recorder(spec, say).run(lambda recorder: _start(spec, say, recorder))
    return _start(spec, say, None)


def _start(spec: JobSpec, say: Say, recorder: Recorder | None) -> int:
    guest_identity(spec.user, spec.group)  # a job user host root cannot have is refused before anything starts
    decision = choose_backend(spec, say)
    if recorder is not None:
        recorder.decided(decision)
    instance = prepare(spec, say, decision)
    # A site that requires signed images: before anything boots, on the descriptor that boots.
    enforce_policy(instance.prepared.image, instance.prepared.image_fd)
    job = Job(instance, say)
    if recorder is not None:
        recorder.ready(job)
    return job.run()

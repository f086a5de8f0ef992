"""`apppot start --record FILE`: one JSON document saying what ran and how it ended, whatever the outcome.

Loaded only when a record is asked for. The Recorder wraps the start of a job: it is told the backend
decision and the prepared job as they become known (``seen``), measures what is about to run before
the boot (hashes of the kernel, image and changes, the command's source), and writes the record when
`apppot start` ends: with the job's status, a 122 or 125 and AppPot's reason, or the signal that
stopped it. A record that cannot be written is never lost silently: AppPot says so and exits 125,
the job's own status given in the line.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apppot import __version__, record_facts
from apppot.errors import EXIT_APPPOT_ERROR, EXIT_GUEST_DIED, AppPotError, unforeseen
from apppot.record_document import Outcome, assemble
from apppot.record_file import RecordFile, strerror
from apppot.say import Say

if TYPE_CHECKING:
    from apppot.backends.choice import Decision
    from apppot.runner import Job
    from apppot.spec import JobSpec


class RecordLost(AppPotError):
    """The --record file could not be written when the job ended."""


class Recorder:
    """Collects what a job ran with; ``run`` writes the record when it ends."""

    def __init__(self, spec: JobSpec, say: Say) -> None:
        assert spec.record is not None
        self.spec = spec
        self.say = say
        self.file = RecordFile(spec.record, spec.jobdir)  # a place the record cannot go is refused before anything runs
        self.started = datetime.now(UTC)
        self.clock = time.monotonic()
        self.decision: Decision | None = None
        self.job: Job | None = None
        self.sections: dict[str, Any] = {}

    def decided(self, decision: Decision) -> None:
        self.decision = decision

    def ready(self, job: Job) -> None:
        """The job is prepared and about to boot: measure what it runs now, before the job can change anything."""
        from apppot.streams import detect_streams

        self.job = job
        instance, spec = job.instance, self.spec
        p = instance.prepared
        interactive = record_facts._known(lambda: detect_streams(spec.no_stdin).interactive) or False
        self.sections.update(
            kernel=record_facts.kernel(instance),
            image=record_facts.image(spec, instance),
            command=record_facts.command(spec, p.jobdir, p.image, interactive),
            job_dir=str(p.jobdir),
            memory={"asked_bytes": spec.mem_bytes, "bytes": p.mem_bytes},
            cpu={"asked": spec.cpu or "auto", "pinned": p.cpu},
            network={"enabled": p.net is not None, "host_loopback": spec.host_loopback},
        )

    def run(self, body: Callable[[Recorder], int]) -> int:
        """``body``'s exit status, after the record of how it ended is written."""
        try:
            try:
                status = body(self)
            except AppPotError as e:
                meaning = "guest-died" if e.exit_code == EXIT_GUEST_DIED else "apppot-error"
                if e.exit_code > 128:  # Interrupted: a signal before the job, 128+N
                    meaning = "stopped"
                self._write_or_raise(self._outcome_of(e.exit_code, meaning, str(e)), said=e)
                raise
            except KeyboardInterrupt:
                self._write_or_raise(Outcome(130, "stopped", None, "SIGINT"), said=None)
                raise
            except BrokenPipeError:
                self._write_or_raise(Outcome(141, "output-closed"), said=None)
                raise
            except OSError as e:  # the CLI says it as an unforeseen error
                self._write_or_raise(Outcome(EXIT_APPPOT_ERROR, "apppot-error", f"{e.strerror or e}"), said=None)
                raise
            except Exception as e:  # a defect of AppPot's: recorded as the CLI says it (unforeseen), then raised
                self._write_or_raise(Outcome(EXIT_APPPOT_ERROR, "apppot-error", unforeseen(e)), said=None)
                raise
            self._write_or_raise(self._job_outcome(status), said=None)
            return status
        finally:
            self.file.close()

    def _outcome_of(self, status: int, meaning: str, reason: str | None) -> Outcome:
        if meaning == "stopped":
            return Outcome(status, meaning, reason, signal.Signals(status - 128).name)
        return Outcome(status, meaning, reason)

    def _job_outcome(self, status: int) -> Outcome:
        job = self.job
        if job is not None and job.signal_received is not None:
            return Outcome(status, "stopped", None, signal.Signals(job.signal_received).name)
        if job is not None and job.stdout_broken:
            return Outcome(status, "output-closed")
        return Outcome(status, "job")

    def document(self, outcome: Outcome) -> dict[str, Any]:
        spec = self.spec
        uname = os.uname()
        sections = {
            "apppot": {"version": __version__},
            "host": {"name": uname.nodename, "release": uname.release, "machine": uname.machine, "uid": os.getuid()},
            "backend": record_facts.backend(spec, self.decision),
            "image": record_facts.image(spec, None),
            "changes": record_facts.changes(spec, self.job.instance if self.job else None, self._changes_info()),
            "cow": {"path": str(spec.cow.absolute())} if spec.cow is not None else None,
            "command": {"argv": list(spec.argv), "source": "argv"} if spec.argv is not None else None,
            "writable_image": spec.writable_image,
            "job_dir": str(spec.jobdir.absolute()),
            "memory": {"asked_bytes": spec.mem_bytes, "bytes": None},
            "cpu": {"asked": spec.cpu or "auto", "pinned": None},
            "network": {"enabled": spec.net, "host_loopback": spec.host_loopback},
            **self.sections,
        }
        return assemble(sections, self.started, datetime.now(UTC), time.monotonic() - self.clock, outcome)

    def _changes_info(self) -> Any:
        return getattr(self.job, "changes_info", None)

    def _write_or_raise(self, outcome: Outcome, said: AppPotError | None) -> None:
        """Write the record; if it cannot be, AppPot's error ``said`` is told first, then the loss (exit 125)."""
        data = (json.dumps(self.document(outcome), indent=2) + "\n").encode()  # ASCII: bytes not UTF-8 stay escaped
        try:
            self.file.write(data)
        except OSError as e:
            if said is not None:
                self.say(f"error: {said}")
            whose = "the job's" if outcome.meaning == "job" else "AppPot's"
            was = f"{whose} status was {outcome.status}"
            raise RecordLost(
                f"cannot write the record {self.spec.record} ({strerror(e)}): {was}; "
                "free space or make its directory writable, and run the job again to have its record"
            ) from None

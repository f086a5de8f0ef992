"""AppPot's errors: each names the problem and the fix in one line."""

from __future__ import annotations

# Exit codes of `apppot start` that are AppPot's own, not the job's.
EXIT_APPPOT_ERROR = 125  # AppPot could not start or run the job
EXIT_GUEST_DIED = 122  # the guest ended without reporting the job's status


class AppPotError(Exception):
    """A failure AppPot explains to the user; the CLI prints it as one line."""

    exit_code = EXIT_APPPOT_ERROR


class UsageError(AppPotError):
    """A bad option or argument."""


class ImageError(AppPotError):
    """A missing, unreadable or malformed appliance image."""


class CowError(AppPotError):
    """A copy-on-write file that cannot be used with the chosen base image."""


class JobDirError(AppPotError):
    """A job directory that AppPot cannot use."""


class HostError(AppPotError):
    """Something missing or misconfigured on the host (binaries, sysctls, namespaces)."""


class GuestDied(AppPotError):
    """The guest ended without reporting the job's exit status."""

    exit_code = EXIT_GUEST_DIED


class Interrupted(AppPotError):
    """AppPot was stopped by a signal before the job started."""

    def __init__(self, signum: int, during: str) -> None:
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name} {during}; no job ran")
        self.exit_code = 128 + signum


class GuestMisbehaved(AppPotError):
    """The guest left something in the report directory that no agent writes: a link, a FIFO, a huge file."""

    exit_code = EXIT_GUEST_DIED


class OutputLost(AppPotError):
    """The host's stdout or stderr did not take all the job wrote (a full disk, /dev/full, a closed stream)."""


class DiskSpaceError(AppPotError):
    """Too little free space, before the boot, for the guest's disk or AppPot's run files."""


class DiskFull(AppPotError):
    """The guest's disk could not be written during the job (its host filesystem filled up): its writes may be lost."""


def unforeseen(e: Exception) -> str:
    """A defect of AppPot's (an exception no check foresaw) as one line: what and where, to be reported."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    detail = f" ({str(e).splitlines()[0]})" if str(e).strip() else ""
    return f"an unforeseen {type(e).__name__}{where}{detail}: a defect of AppPot's; please report it with the command you ran"

"""The one place that runs helper programs to completion: argv lists, typed failures."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence

from apppot.errors import HostError

PR_SET_PDEATHSIG = 1  # prctl(2)

# Set by the CLI under --verbose: where to say which commands run.
verbose: Callable[[str], None] | None = None


# Debian keeps tools a plain user may run (mkfs.ext4, debugfs) here, off a plain user's PATH.
SYSTEM_DIRS = ("/usr/sbin", "/sbin")


def which(program: str) -> str | None:
    """Like shutil.which, without importing shutil (and bz2, lzma) on every job start; also looks in
    SYSTEM_DIRS after PATH."""
    for directory in [*os.environ.get("PATH", os.defpath).split(os.pathsep), *SYSTEM_DIRS]:
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def parent_death_signal(signum: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the child sent ``signum`` when the thread that started it ends, so that
    a child outside bubblewrap (whose --die-with-parent does this) cannot outlive a SIGKILLed AppPot."""
    import ctypes  # only for such children: loading it costs a few milliseconds

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent ended before the request took
            os.kill(os.getpid(), signum)

    return preexec


SLOW_NOTICE_S = 2.0  # a helper that takes longer is said to be waited for (with run's ``slow``)


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    package: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    slow: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a helper program with stdin closed (unless ``input``), capturing its output.

    ``env`` adds to the environment; ``cwd`` is where it runs; ``package`` names the Debian package to
    install when the program is missing; ``slow`` names what it waits for, said on stderr once the
    program has run for SLOW_NOTICE_S (a batch system that is down can take many seconds to answer).
    On failure (with ``check``) raises HostError naming the exact command and its status.
    """
    if verbose:
        verbose(f"running: {shlex.join(argv)}")
    argv = list(argv)
    if "/" not in argv[0]:
        argv[0] = which(argv[0]) or argv[0]  # mkfs.ext4 is in /usr/sbin, not on a plain user's PATH
    notice = None
    if slow is not None:
        import threading

        from apppot.say import say_stderr

        notice = threading.Timer(SLOW_NOTICE_S, say_stderr, [f"waiting for {slow}..."])
        notice.daemon = True
        notice.start()
    try:
        result = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            check=False,
            env={**os.environ, **env} if env else None,
            cwd=cwd,
        )
    except FileNotFoundError:
        hint = f"sudo apt-get install {package}" if package else "install it"
        raise HostError(f"{argv[0]} is not installed: {hint}") from None
    finally:
        if notice is not None:
            notice.cancel()
    if check and result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        last = detail[-1] if detail else "no message"
        raise HostError(f"{shlex.join(argv)} failed with status {result.returncode}: {last}")
    return result

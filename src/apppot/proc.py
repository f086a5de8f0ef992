"""The one place that runs helper programs to completion: argv lists, typed failures."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence

from apppot.errors import HostError

# Set by the CLI under --verbose: where to say which commands run.
verbose: Callable[[str], None] | None = None


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    package: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a helper program with stdin closed (unless ``input``), capturing its output.

    ``env`` adds to the environment; ``package`` names the Debian package to
    install when the program is missing. On failure (with ``check``) raises
    HostError naming the exact command and its status.
    """
    if verbose:
        verbose(f"running: {shlex.join(argv)}")
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            check=False,
            env={**os.environ, **env} if env else None,
        )
    except FileNotFoundError:
        hint = f"sudo apt-get install {package}" if package else "install it"
        raise HostError(f"{argv[0]} is not installed: {hint}") from None
    if check and result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        last = detail[-1] if detail else "no message"
        raise HostError(f"{shlex.join(argv)} failed with status {result.returncode}: {last}")
    return result

"""How library code tells the user something while it works: a callable that takes one line."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

Say = Callable[[str], None]


def say_stderr(message: str) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a stderr that fails cannot be told; the job goes on
        sys.stderr.write(f"apppot: {message}\n")
        sys.stderr.flush()

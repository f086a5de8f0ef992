"""Reading a file someone else may have made, no further than a limit."""

from __future__ import annotations

import os


def read_at_most(fd: int, limit: int) -> bytes | None:
    """The bytes of the open file ``fd`` (read to its end), or None when it holds more than ``limit``:
    at most limit + 1 bytes are ever read, whatever its size says. OSError passes through."""
    chunks = []
    left = limit + 1
    while left > 0 and (chunk := os.read(fd, left)):
        chunks.append(chunk)
        left -= len(chunk)
    return None if left <= 0 else b"".join(chunks)

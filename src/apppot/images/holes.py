"""The data regions of a sparse file: what a copy must carry (holes are left out and stay holes)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator


def data_regions(fd: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of data in fd, in order (SEEK_DATA/SEEK_HOLE)."""
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end

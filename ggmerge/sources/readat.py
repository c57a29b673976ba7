"""Positional reads into a caller's buffer: the one way tensor bytes come off the disk.

``os.preadv`` takes the offset with the call, so several threads can read one open file at once (the
evaluator's workers do), and the bytes land in the tensor's own buffer with no intermediate copy.
Reading rather than memory-mapping keeps inputs out of the process's resident set: the pages stay in the
page cache, reclaimable, and in our memory only as long as the tensor does.
"""
from __future__ import annotations

import os


def read_at(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` with the file's bytes from ``offset``; OSError if the file ends first."""
    done, n = 0, len(buf)
    while done < n:  # a read may return less than asked (e.g. > 2 GB on Linux)
        k = os.preadv(fd, [buf[done:]], offset + done)
        if not k:
            raise OSError(f"the file ends {n - done} bytes before the tensor does (truncated, or changed while open?)")
        done += k

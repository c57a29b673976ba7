"""How many CPUs this process may use: the default thread count of the build pass and the quantizers."""
from __future__ import annotations

import os


def default_threads() -> int:
    """The CPUs this process may use (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)

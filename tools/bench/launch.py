"""Measure one command as its own child: wall, CPU, peak RSS and bytes read/written; print one JSON line.

    python tools/bench/launch.py OUT.json LOG -- CMD ARGS...

Run by ``run.py`` as a fresh process per measurement, so that ``RUSAGE_CHILDREN`` (whose ``ru_maxrss`` is
the largest resident set of any waited-for descendant) and this process's ``/proc/self/io`` (which, once
the child is reaped, includes the child's and its descendants' I/O — the kernel adds them to the parent
on ``wait``) describe exactly this command and nothing measured before it. Standard library only, so any
interpreter can run it.

Fields: ``wall`` s, ``cpu`` s (user+sys), ``user``, ``sys``, ``maxrss`` bytes, ``rchar``/``wchar``
(bytes passed through read/write syscalls: page-cache hits count, memory-mapped reads do NOT),
``read_bytes``/``write_bytes`` (bytes the storage layer read, and dirtied for writing), ``rc``.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def _io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def main() -> int:
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    out_json, log_path, cmd = sys.argv[1], sys.argv[2], sys.argv[4:]
    with open(log_path, "ab") as log:
        io0 = _io()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        io1 = _io()
    user, sys_ = ru.ru_utime - ru0.ru_utime, ru.ru_stime - ru0.ru_stime
    rec = {
        "wall": wall, "cpu": user + sys_, "user": user, "sys": sys_,
        "maxrss": ru.ru_maxrss * 1024,  # Linux reports KiB
        **{k: io1[k] - io0[k] for k in ("rchar", "wchar", "read_bytes", "write_bytes")},
        "rc": rc, "cmd": cmd,
    }
    with open(out_json, "w") as f:
        json.dump(rec, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

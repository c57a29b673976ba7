"""Measure one command as its own child: wall, CPU, peak RSS and bytes read/written; print one JSON line.

    python tools/bench/launch.py OUT.json LOG -- CMD ARGS...

Run by ``run.py`` as a fresh process per measurement, so that ``RUSAGE_CHILDREN`` (whose ``ru_maxrss`` is
the largest resident set of any waited-for descendant) and this process's ``/proc/self/io`` (which, once
the child is reaped, includes the child's and its descendants' I/O — the kernel adds them to the parent
on ``wait``) describe exactly this command and nothing measured before it. The /proc readers are
ggmerge/procstats.py's, shared with the memory tests.

Fields: ``wall`` s, ``cpu`` s (user+sys), ``user``, ``sys``, ``maxrss`` bytes, ``rchar``/``wchar``
(bytes passed through read/write syscalls: page-cache hits count, memory-mapped reads do NOT),
``read_bytes``/``write_bytes`` (bytes the storage layer read, and dirtied for writing), ``minflt``/``majflt``
(page faults: many minor faults mean large temporaries allocated afresh), ``rss_anon``/``rss_file``
(sampled peaks of anonymous and file-backed resident memory of the direct child), ``rc``.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

from ggmerge.procstats import RssSampler, io_counters


def main() -> int:
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    out_json, log_path, cmd = sys.argv[1], sys.argv[2], sys.argv[4:]
    with open(log_path, "ab") as log:
        io0 = io_counters()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        sampler = RssSampler(child.pid)
        sampler.start()
        rc = child.wait()
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        io1 = io_counters()
    user, sys_ = ru.ru_utime - ru0.ru_utime, ru.ru_stime - ru0.ru_stime
    rec = {
        "wall": wall, "cpu": user + sys_, "user": user, "sys": sys_,
        "maxrss": ru.ru_maxrss * 1024,  # Linux reports KiB
        **{k: io1[k] - io0[k] for k in ("rchar", "wchar", "read_bytes", "write_bytes")},
        "rss_anon": sampler.anon, "rss_file": sampler.file,
        "minflt": ru.ru_minflt - ru0.ru_minflt, "majflt": ru.ru_majflt - ru0.ru_majflt,
        "rc": rc, "cmd": cmd,
    }
    with open(out_json, "w") as f:
        json.dump(rec, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

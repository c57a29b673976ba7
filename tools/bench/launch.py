"""Measure one command as its own child: wall, CPU, peak RSS and bytes read/written; print one JSON line.

    python tools/bench/launch.py OUT.json LOG -- CMD ARGS...

Run by ``run.py`` as a fresh process per measurement, so that ``RUSAGE_CHILDREN`` (whose ``ru_maxrss`` is
the largest resident set of any waited-for descendant) and this process's ``/proc/self/io`` (which, once
the child is reaped, includes the child's and its descendants' I/O — the kernel adds them to the parent
on ``wait``) describe exactly this command and nothing measured before it. Standard library only, so any
interpreter can run it.

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
import threading
import time


def _io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def rss_anon_file(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of ``pid`` in bytes, from /proc/PID/status (ru_maxrss cannot tell them apart)."""
    anon = file = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) * 1024
    return anon, file


class RssSampler(threading.Thread):
    """Peaks of RssAnon and RssFile of the child, polled from /proc/PID/status every 50 ms.

    ru_maxrss counts file pages mapped into the process too: a tool that memory-maps its inputs shows
    them in its peak RSS although the kernel can drop them at any time. Anonymous memory (heap,
    tensors) is what really has to fit, so both are recorded."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.anon, self.file = pid, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                anon, file = rss_anon_file(self.pid)
                self.anon, self.file = max(self.anon, anon), max(self.file, file)
            except (OSError, ValueError):
                pass
            self.stop.wait(0.05)


def main() -> int:
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    out_json, log_path, cmd = sys.argv[1], sys.argv[2], sys.argv[4:]
    with open(log_path, "ab") as log:
        io0 = _io()
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
        io1 = _io()
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

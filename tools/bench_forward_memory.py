"""Peak memory of the layer-wise forward pass (``ggmerge imatrix``, ``ggmerge verify --text-file``) on
Mistral-7B-shaped models at reduced depth.

The forward pass keeps one decoder layer in float32 plus the hidden states of the chunks in flight, so its
peak must not grow with depth: this runs the same 7B-wide model (hidden 4096, FFN 14336, GQA 32/8,
vocab 32000, bf16 safetensors generated deterministically by tools/bench_memory.py's machinery) at 1 and 2
layers and reports peak RSS (anonymous and file-backed, sampled) against the import baseline, one layer's
float32 weights and the activations, and the projection for 32 layers (the same peak, if it does not grow).

    python tools/bench_forward_memory.py                # ~15 min on 2 busy cores, ~4 GB of scratch
    python tools/bench_forward_memory.py --no-write
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

MB = 1e6
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)


def layer_f32_bytes(cfg: dict) -> int:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return 4 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)


def activation_bytes(cfg: dict, ctx: int, chunks: int) -> int:
    """Hidden states of all chunks + one chunk's FFN intermediates (gate, up, product) + one chunk's
    scored logits in float64 blocks and float32."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg.get("vocab_size", 32000)
    return 4 * chunks * ctx * h + 3 * 4 * ctx * i + 4 * ctx * v + 4 * (ctx // 2) * v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench-forward-memory")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--text-file", default=None, help="default: botchan.txt as tools/bench_quality.py fetches it")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from bench_memory import write_streaming
    from bench_quality import text_file

    from ggmerge.miniature import config
    from ggmerge.procstats import measure_ggmerge

    txt = Path(args.text_file) if args.text_file else text_file(work)
    load0 = os.getloadavg()
    rows = []
    for n in args.layers:
        cfg = config(**SHAPE, num_hidden_layers=n)
        hf = write_streaming(work / f"7b-{n}l", cfg, "base", 0.0)
        gguf = work / f"7b-{n}l.F16.gguf"
        if not gguf.is_file():
            measure_ggmerge(["convert", hf, "-o", gguf, "--outtype", "f16"])
        for verb, cmd in (
            ("imatrix", ["imatrix", hf, "--text-file", txt, "--ctx", args.ctx, "--chunks", args.chunks,
                         "-o", work / f"7b-{n}l.imatrix.gguf", "--force"]),
            ("verify --text-file", ["verify", gguf, "--ref", hf, "--text-file", txt, "--ctx", args.ctx,
                                    "--chunks", args.chunks, "--json"]),
        ):
            m = measure_ggmerge(cmd)
            rows.append(dict(verb=verb, layers=n, **m,
                             layer=layer_f32_bytes(cfg), act=activation_bytes(cfg, args.ctx, args.chunks),
                             model=sum(f.stat().st_size for f in hf.glob("*.safetensors"))))
            print(rows[-1], flush=True)
    load1 = os.getloadavg()
    lines = [f"Mistral-7B-wide (hidden 4096, FFN 14336, GQA 32/8, vocab 32000, bf16), ctx {args.ctx}, "
             f"{args.chunks} chunks of botchan.txt; {os.cpu_count()} CPUs, load average {load0[0]:.1f} at start, "
             f"{load1[0]:.1f} at end. Peaks of the whole ggmerge process (sampled /proc, ru_maxrss); "
             "baseline = a process importing the same modules; bound = baseline + one layer in float32 + "
             "activations.", "",
             "| pass | layers | model (bf16) | peak RSS | anon peak | file peak | baseline | one layer f32 | "
             "activations | bound | peak − baseline | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bound = r["baseline"] + r["layer"] + r["act"]
        lines.append(f"| {r['verb']} | {r['layers']} | {r['model'] / MB:.0f} MB | {r['maxrss'] / MB:.0f} MB | "
                     f"{r['anon'] / MB:.0f} MB | {r['file'] / MB:.0f} MB | {r['baseline'] / MB:.0f} MB | "
                     f"{r['layer'] / MB:.0f} MB | {r['act'] / MB:.0f} MB | {bound / MB:.0f} MB | "
                     f"{(r['maxrss'] - r['baseline']) / MB:.0f} MB | {r['wall']:.0f} s |")
    by = {}
    for r in rows:
        by.setdefault(r["verb"], []).append(r)
    lines.append("")
    for verb, rs in by.items():
        rs.sort(key=lambda r: r["layers"])
        a, b = rs[0], rs[-1]
        per_layer = (b["anon"] - a["anon"]) / max(b["layers"] - a["layers"], 1)
        proj = b["anon"] + per_layer * (32 - b["layers"])
        lines.append(f"- {verb}: anonymous peak {a['anon'] / MB:.0f} MB at {a['layers']} layer(s), "
                     f"{b['anon'] / MB:.0f} MB at {b['layers']}: {per_layer / MB:+.0f} MB per layer → projected "
                     f"{proj / MB:.0f} MB at 32 layers (a 14.5 GB bf16 model; float32 whole would be ~29 GB).")
    out = "\n".join(lines)
    print(out)
    if not args.no_write:
        from bench_memory import write_section

        write_section(ROOT / "BENCHMARKS.md", f"`python tools/bench_forward_memory.py` ({time.strftime('%Y-%m-%d')}).\n\n{out}",
                      "## Memory of the layer-wise forward pass (imatrix, verify --text-file)")


if __name__ == "__main__":
    main()

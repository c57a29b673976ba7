"""Benchmark ``ggmerge quantize`` against llama.cpp's ``llama_model_quantize`` on the same F16 GGUF.

For each type (Q4_K_M, Q6_K) and each tool, ``--runs`` runs, each in its own subprocess so that wall
time, CPU time and peak RSS belong to that run alone (``os.wait4`` gives the child's rusage). The
outputs are compared byte for byte. The table is printed and written into BENCHMARKS.md's
``## Quantize`` section together with the exact command.

    python tools/bench_quantize.py            # ~0.5B-parameter Mistral-shaped random model
    python tools/bench_quantize.py --quick    # ~20M parameters, a minute or so
    python tools/bench_quantize.py --input model.F16.gguf
    python tools/bench_quantize.py --imatrix auto --llama-quantize /path/to/llama-quantize

With ``--imatrix FILE`` (``auto``: one written by ggmerge's writer for the input, with skewed per-column
sums) both sides use the importance matrix: ``ggmerge quantize TYPE --imatrix FILE`` against the real
``llama-quantize --imatrix FILE`` binary (the library call cannot record the ``quantize.imatrix.*``
metadata the tool adds), each in its own subprocess; its table goes to its own block.

The default input is written here with gguf-py, deterministically (values depend only on the size
and the tensor name), streaming one tensor at a time; it is cached in ``--work``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        hd = self.hidden // self.heads
        out = [("token_embd.weight", (self.vocab, self.hidden)), ("output_norm.weight", (self.hidden,)),
               ("output.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            b = f"blk.{i}."
            out += [(b + "attn_norm.weight", (self.hidden,)),
                    (b + "attn_q.weight", (self.heads * hd, self.hidden)),
                    (b + "attn_k.weight", (self.kv_heads * hd, self.hidden)),
                    (b + "attn_v.weight", (self.kv_heads * hd, self.hidden)),
                    (b + "attn_output.weight", (self.hidden, self.heads * hd)),
                    (b + "ffn_norm.weight", (self.hidden,)),
                    (b + "ffn_gate.weight", (self.ffn, self.hidden)),
                    (b + "ffn_up.weight", (self.ffn, self.hidden)),
                    (b + "ffn_down.weight", (self.hidden, self.ffn))]
        return out

    def params(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors())


SIZES = {
    # Mistral-7B's proportions (GQA 4, ffn 3.5×, 32000 vocab) scaled down
    "default": Shape(hidden=1536, layers=16, heads=12, kv_heads=4, ffn=5376, vocab=32000),
    "quick": Shape(hidden=512, layers=4, heads=8, kv_heads=2, ffn=1792, vocab=8000),
}


def make_f16_gguf(path: Path, s: Shape) -> Path:
    """A llama-architecture F16 GGUF with random weights and a byte-level SPM vocabulary."""
    import gguf

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("bench")
    w.add_context_length(2048)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_dimension_count(s.hidden // s.heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁t{i}" for i in range(s.vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(s.vocab)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (s.vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors = s.tensors()
    for name, shape in tensors:
        dt = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in tensors:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if len(shape) == 1:
            w.write_tensor_data((1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)))
        else:
            # heavier tails than a Gaussian, like trained weights (Student-t, 5 dof)
            x = rng.standard_t(5, size=shape).astype(np.float32) * np.float32(0.5 / np.sqrt(shape[-1]))
            w.write_tensor_data(x.astype(np.float16))
    w.close()
    os.replace(tmp, path)
    return path


_CHILD = {
    "ggmerge": (
        "import json,sys,time,logging\n"
        "logging.basicConfig(level=logging.ERROR)\n"
        "from ggmerge.quantize import quantize\n"
        "im=sys.argv[4] if len(sys.argv)>4 else None\n"
        "t=time.perf_counter(); quantize(sys.argv[1], sys.argv[2], sys.argv[3], force=True, imatrix=im)\n"
        "print(json.dumps({'inner': time.perf_counter()-t}))\n"),
    "llama.cpp": (
        "import ctypes,json,os,sys,time\n"
        "import llama_cpp\n"
        "from ggmerge.convert.quants.ftypes import parse_ftype\n"
        "p=llama_cpp.llama_model_quantize_default_params(); p.ftype=int(parse_ftype(sys.argv[1]).ftype)\n"
        "p.nthread=int(os.environ.get('BENCH_THREADS','2'))\n"
        "t=time.perf_counter()\n"
        "rc=llama_cpp.llama_model_quantize(sys.argv[2].encode(), sys.argv[3].encode(), ctypes.byref(p))\n"
        "assert rc==0, rc\n"
        "print(json.dumps({'inner': time.perf_counter()-t}))\n"),
}


def warm_kernels() -> None:
    """Compile every quantizer once (numba caches it on disk), so no timed run pays for compiling."""
    from ggmerge.convert.quants import quantize
    from ggmerge.convert.quants.types import TABLE

    x = np.linspace(-1, 1, 512, dtype=np.float32)[None, :]
    w = np.linspace(0.1, 2, 512, dtype=np.float32)
    for qtype in TABLE:
        quantize(x, qtype)
        quantize(x, qtype, imatrix=w)


def synthetic_imatrix(src: Path, path: Path) -> Path:
    """An imatrix for every 2-D weight of ``src`` (skewed column sums, a few hot columns), written by
    ggmerge's writer in llama.cpp's format; deterministic."""
    import gguf

    from ggmerge.imatrix.files import write_imatrix

    if path.is_file() and path.stat().st_mtime_ns > src.stat().st_mtime_ns:
        return path
    entries = {}
    for t in gguf.GGUFReader(src).tensors:
        if len(t.shape) < 2 or t.name.startswith(("token_embd", "output.")):
            continue
        rng = np.random.default_rng(zlib.crc32(t.name.encode()))
        n = int(t.shape[0])
        sums = (rng.standard_normal(n) ** 2 * 40).astype(np.float32)
        sums[rng.integers(0, n, 4)] *= 300
        entries[t.name] = (sums, 4096)
    return write_imatrix(path, entries, datasets=["synthetic"], chunk_count=8, chunk_size=512)


def run_child(tool: str, qtype: str, src: Path, dst: Path, threads: int, imatrix: Path | None = None,
              exe: Path | None = None) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(threads), GGMERGE_PROGRESS="0")
    log = dst.with_suffix(".log")
    if tool == "llama-quantize":
        argv = [str(exe), "--imatrix", str(imatrix), str(src), str(dst), qtype, str(threads)]
    else:
        argv = [sys.executable, "-c", _CHILD[tool], qtype, str(src), str(dst)]
        if imatrix is not None:
            argv.append(str(imatrix))
    t0 = time.perf_counter()
    with open(log, "wb") as fo:
        # output to a file, not a pipe: the child is reaped by os.wait4 (its own rusage), not by Popen
        p = subprocess.Popen(argv, stdout=fo, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = status
    wall = time.perf_counter() - t0
    out = log.read_text(errors="replace")
    if status != 0:
        sys.exit(f"{tool} {qtype} failed:\n{out[-3000:]}")
    if tool == "llama-quantize":  # "main: quantize time = 1234.56 ms"
        inner = float(next(ln for ln in out.splitlines() if "quantize time" in ln).split("=")[1].split()[0]) / 1e3
    else:
        inner = json.loads([ln for ln in out.splitlines() if ln.startswith('{"inner"')][-1])["inner"]
    return {"wall": wall, "inner": inner, "cpu": ru.ru_utime + ru.ru_stime,
            "rss_mb": ru.ru_maxrss / 1024, "bytes": dst.stat().st_size}


def compare(a: Path, b: Path) -> str:
    import gguf

    if a.read_bytes() == b.read_bytes():
        return "yes (whole file)"
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta = {t.name: np.asarray(t.data).tobytes() for t in ra.tensors}
    tb = {t.name: np.asarray(t.data).tobytes() for t in rb.tensors}
    same = sum(ta[n] == tb.get(n) for n in ta)
    return f"no ({same}/{len(ta)} tensors identical)"


def write_section(md: Path, key: str, body: str, tool: str = "tools/bench_quantize.py") -> None:
    """Put ``body`` into BENCHMARKS.md's ``## Quantize`` section between ``quantize:<key>`` markers,
    replacing that block only (so the kernel table and each model size keep their own block).
    Unmarked text in the section (an older layout) is dropped; other sections are left alone."""
    text = (md.read_text() if md.is_file()
            else "# Benchmarks\n\nMeasured on the project's 2-core CI-sized machine.\n")
    head = "## Quantize\n"
    intro = ("\nggmerge's quantizers against llama.cpp's, on this machine. Blocks are regenerated by the "
             "commands they name.\n")
    begin = f"<!-- quantize:{key}:begin (generated by {tool}; edit outside these markers) -->\n"
    end = f"<!-- quantize:{key}:end -->\n"
    block = begin + body.strip("\n") + "\n" + end
    start = text.find(head)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + head + intro + "\n" + block
        md.write_text(text)
        return
    stop = text.find("\n## ", start + len(head))
    stop = len(text) if stop < 0 else stop + 1
    section = text[start + len(head):stop]
    if "<!-- quantize:" not in section:
        section = intro
    b = section.find(f"<!-- quantize:{key}:begin")
    if b >= 0:
        e = section.index(end, b) + len(end)
        section = section[:b] + block + section[e:]
    else:
        section = section.rstrip("\n") + "\n\n" + block
    text = text[:start] + head + section.rstrip("\n") + "\n\n" + text[stop:].lstrip("\n")
    md.write_text(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model (~20M parameters)")
    ap.add_argument("--input", type=Path, help="an F16/BF16 GGUF to use instead of the generated one")
    ap.add_argument("--types", default="Q4_K_M,Q6_K")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp nthread")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ggmerge-bench/quantize"))
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--imatrix", help="an imatrix file for both tools, or 'auto' (written for the input)")
    ap.add_argument("--llama-quantize", type=Path, help="the llama-quantize binary (needed with --imatrix; "
                    "default: tests/llama_tools.py's cached build)")
    args = ap.parse_args(argv)

    size = "quick" if args.quick else "default"
    if args.input:
        src, what = args.input, f"`{args.input.name}`"
    else:
        s = SIZES[size]
        src = make_f16_gguf(args.work / f"bench-{size}-{s.hidden}x{s.layers}.F16.gguf", s)
        what = (f"random Mistral-shaped F16 GGUF, {s.params() / 1e6:.0f}M parameters "
                f"(hidden {s.hidden}, {s.layers} layers, GQA {s.heads}/{s.kv_heads}, ffn {s.ffn}, "
                f"vocab {s.vocab})")
    print(f"input: {src} ({src.stat().st_size / 1e6:.0f} MB)", flush=True)

    imatrix = exe = None
    tools = ("llama.cpp", "ggmerge")
    if args.imatrix:
        imatrix = (synthetic_imatrix(src, args.work / f"{src.stem}.imatrix.gguf") if args.imatrix == "auto"
                   else Path(args.imatrix))
        exe = args.llama_quantize
        if exe is None:
            sys.path.insert(0, str(ROOT / "tests"))
            import llama_tools
            exe = llama_tools.tool("llama-quantize")
        tools = ("llama-quantize", "ggmerge")
        print(f"imatrix: {imatrix}; llama-quantize: {exe}", flush=True)
    warm_kernels()
    load_before = os.getloadavg()[0]
    rows = []
    for qtype in args.types.split(","):
        outs = {}
        for tool in tools:
            res = []
            for r in range(args.runs):
                dst = args.work / f"{tool.replace('.', '')}.{qtype}.gguf"
                res.append(run_child(tool, qtype, src, dst, args.threads, imatrix, exe))
                print(f"  {qtype} {tool} run {r + 1}: {res[-1]['wall']:.1f} s wall, "
                      f"{res[-1]['cpu']:.1f} s CPU, {res[-1]['rss_mb']:.0f} MB", flush=True)
            outs[tool] = dst
            rows.append([qtype, tool, *(statistics.median(x[k] for x in res)
                                        for k in ("wall", "inner", "cpu", "rss_mb")), res[-1]["bytes"]])
        ident = compare(outs["ggmerge"], outs[tools[0]])
        rows[-1].append(ident)
        rows[-2].append(ident)

    cmd = "python tools/bench_quantize.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    lines = [("| type | tool | wall s (median) | of which quantizing s | CPU s | peak RSS MB | output bytes "
              "| byte-identical | wall / llama.cpp's |"), "|---|---|---|---|---|---|---|---|---|"]
    ref_wall = {}
    for q, tool, wall, inner, cpu, rss, nb, ident in rows:
        ref_wall.setdefault(q, wall)
        lines.append(f"| {q} | {tool} | {wall:.2f} | {inner:.2f} | {cpu:.2f} | {rss:.0f} | {nb:,} | {ident} "
                     f"| {wall / ref_wall[q]:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    import llama_cpp
    import numba
    title = f"size `{size}`" if not args.input else f"`{args.input.name}`"
    if imatrix is not None:
        title += ", with an imatrix"
    ref_tool = (f"the `llama-quantize` binary built from the same llama.cpp source, `--imatrix` "
                f"{'(written by ggmerge for this input: skewed column sums)' if args.imatrix == 'auto' else imatrix.name}"
                f", {args.threads} threads" if imatrix is not None else
                f"`llama_model_quantize` from llama-cpp-python {llama_cpp.__version__}, nthread={args.threads}, "
                f"no imatrix")
    body = (
        f"### Whole file, {title}\n\nCommand: `{cmd}` (from the repository root)\n\n"
        f"Input: {what}. Each figure is the median of {args.runs} runs, each in a fresh subprocess "
        f"(wall and CPU include interpreter start-up and imports; \"of which quantizing\" is the call "
        f"alone; peak RSS is the child's maximum resident set, which counts the pages of the "
        f"memory-mapped input a tool has read). llama.cpp: {ref_tool}. ggmerge's kernels "
        f"(numba {numba.__version__}) were compiled beforehand into numba's on-disk cache, as after "
        f"any first run; loading numba and the cached kernels still costs each run about half a "
        f"second and ~120 MB of RSS (LLVM, ~45 MB of it anonymous).\n\n"
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, numpy {np.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; 1-minute load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after (other work on the machine inflates wall times; CPU "
        f"times are the steadier figure).\n\n{table}\n")
    if not args.no_write:
        key = (size if not args.input else "input") + ("-imatrix" if imatrix is not None else "")
        write_section(ROOT / "BENCHMARKS.md", key, body)
        print(f"\nwrote the Quantize section of {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()

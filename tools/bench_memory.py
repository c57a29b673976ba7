"""Peak memory of ggmerge's streaming passes against the size of the model and of its largest tensor.

Large models must not need RAM proportional to the model: every pass streams tensor by tensor, so its
peak resident set should be a few times the largest tensor (times the number of inputs for a merge),
whatever the model size. This script checks that on an HF Mistral-shaped bf16 model of ~1 GB whose
largest tensor (the embedding) is ~1/15 of it:

    convert HF → BF16 GGUF,  quantize Q4_K_M,  convert GGUF → HF,
    build: a 3-model task_arithmetic recipe (three ~1 GB inputs),
    build: the seed-shaped recipe (examples/ninja-mini, 8 inputs of ~180 MB).

Each pass runs in its own subprocess, spawned by a small launcher, so its ``ru_maxrss`` (from
``os.wait4``) is its own and not inflated by this script's memory; RssAnon and
RssFile of the child are also sampled from /proc every 20 ms to show whether the peak is heap (tensors
in flight) or file-backed pages of memory-mapped inputs. The import baseline is the peak of a
subprocess that only imports every module the pass imported (torch, numba, tokenizer libraries, …):
what any run pays whatever the model size. The table is printed and written into BENCHMARKS.md's ``## Memory`` section.

    python tools/bench_memory.py                 # ~1 GB model, ~10 minutes on 2 cores
    python tools/bench_memory.py --size small    # ~250 MB model, a couple of minutes
    python tools/bench_memory.py --no-write      # print only

Models are generated deterministically (values depend only on size, role and tensor name), streamed
one tensor at a time straight into their safetensors file, and cached in ``--work``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ggmerge import procstats  # noqa: E402

MB = 1e6


@dataclass(frozen=True)
class Size:
    """Dims of the big model (HF config overrides) and of the eight seed-recipe models."""
    big: dict
    seed: dict


SIZES = {
    # Mistral-7B's proportions (GQA 4:1, head_dim 128, ffn 3.5×) at hidden 1024, 32 layers:
    # 0.50B parameters = 1.01 GB bf16; largest tensor embed/lm_head 32000×1024 = 65.5 MB (1/15)
    "1gb": Size(big=dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=32,
                         num_attention_heads=8, num_key_value_heads=2),
                seed=dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=16,
                          num_attention_heads=4, num_key_value_heads=2)),
    # 0.12B parameters = 243 MB bf16; largest tensor 32000×256 = 16.4 MB (1/15)
    "small": Size(big=dict(hidden_size=256, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=4, num_key_value_heads=2),
                  seed=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2)),
}

#: the three inputs of the task_arithmetic build: (role, delta scale relative to the base's std)
BIG_ROLES = (("base", 0.0), ("ft1", 0.05), ("ft2", 0.05))

TASK3 = """\
# three ~1 GB inputs, one output: base + 0.5·(ft1 − base) + 0.5·(ft2 − base)
merge_method: task_arithmetic
base_model: models/base
models:
  - model: models/ft1
    parameters: {weight: 0.5}
  - model: models/ft2
    parameters: {weight: 0.5}
dtype: bfloat16
ggmerge: {name: task3}
"""


# --- deterministic models, streamed ------------------------------------------------------------

def _generator(label: str):
    import torch

    seed = int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


def write_streaming(folder: Path, cfg: dict, role: str, delta: float) -> Path:
    """An HF folder whose one ``model.safetensors`` is written tensor by tensor (header first: every
    offset follows from the shapes), with the real Mistral v1 tokenizer. Skipped if already there."""
    import torch

    from ggmerge.atomic import atomic_path
    from ggmerge.miniature import spm_v1, tensor_shapes
    from ggmerge.writers.hf import safetensors_header

    if (folder / "config.json").is_file():
        return folder
    print(f"  generating {folder}", flush=True)
    shapes = tensor_shapes(cfg)
    entries, off = [], 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        entries.append((name, "BF16", list(shape), off, off + n))
        off += n
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(safetensors_header(entries, {"format": "pt"}))
            for name, shape in shapes.items():
                # the same law as ggmerge.miniature.weights: a shared root plus a seeded per-role delta
                if len(shape) == 1:
                    w = 1.0 + 0.1 * torch.randn(shape, generator=_generator(f"root/{name}"))
                else:
                    w = torch.randn(shape, generator=_generator(f"root/{name}")) * shape[1] ** -0.5
                if delta:
                    w += delta * w.std() * torch.randn(shape, generator=_generator(f"{role}/{name}"))
                f.write(w.to(torch.bfloat16).view(torch.uint8).numpy().data)
                del w
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.copyfile(spm_v1(), tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False}, indent=2) + "\n")
    return folder


def make_inputs(work: Path, size: Size) -> dict:
    from ggmerge.miniature import MISTRAL_INST_TEMPLATE, ROLES, config, write_model

    big = work / "big"
    cfg = config(**size.big)
    for role, delta in BIG_ROLES:
        write_streaming(big / "models" / role, cfg, role, delta)
    (big / "task3.yaml").write_text(TASK3)
    seed = work / "seed"
    scfg = config(**size.seed)
    for role in ROLES:
        if not (seed / "models" / role / "config.json").is_file():
            print(f"  generating {seed / 'models' / role}", flush=True)
            write_model(seed / "models" / role, role, scfg,
                        chat_template=MISTRAL_INST_TEMPLATE if "Instruct" in role else None)
    text = (ROOT / "examples" / "ninja-mini" / "ggmerge.yaml").read_text().replace("  miniature: models\n", "")
    (seed / "ggmerge.yaml").write_text(text)
    return {"big": big, "seed": seed, "roles": list(ROLES)}


def safetensors_stats(folders: list[Path]) -> tuple[int, int]:
    """(total tensor bytes, largest tensor bytes) over the safetensors of ``folders``."""
    from ggmerge.sources.safetensors import _read_header

    total = largest = 0
    for folder in folders:
        for shard in sorted(folder.glob("*.safetensors")):
            for name, info in _read_header(shard).items():
                if name != "__metadata__":
                    b, e = info["data_offsets"]
                    total += e - b
                    largest = max(largest, e - b)
    return total, largest


def gguf_stats(path: Path) -> tuple[int, int]:
    import gguf

    r = gguf.GGUFReader(path, "r")
    sizes = [int(t.n_bytes) for t in r.tensors]
    return sum(sizes), max(sizes)


# --- measuring one subprocess ---------------------------------------------------------------------
# (ggmerge/procstats.py: the launcher, the RSS sampler and the import baseline, shared with the tests)


def measure(argv: list[str], cwd: Path | None = None) -> dict:
    try:
        return procstats.measure(argv, cwd, env={"PYTHONPATH": str(ROOT)})
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def run_ggmerge(args: list[str], cwd: Path | None = None) -> dict:
    try:
        return procstats.measure_ggmerge(args, cwd, env={"PYTHONPATH": str(ROOT)})
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def torch_baseline() -> int:
    """Peak RSS of python importing torch and nothing else (for reference)."""
    return measure([sys.executable, "-c", "import torch"])["maxrss"]


# --- the passes ----------------------------------------------------------------------------------

PASSES = ("convert", "quantize", "back", "task3", "seed")


def passes(work: Path, inputs: dict, skip: set[str]) -> list[dict]:
    big = inputs["big"]
    models = big / "models"
    x = work / "out" / "x.bf16.gguf"
    q = work / "out" / "x.Q4_K_M.gguf"
    hf2 = work / "out" / "hf2"
    (work / "out").mkdir(parents=True, exist_ok=True)
    base_bytes, base_largest = safetensors_stats([models / "base"])
    all3 = safetensors_stats([models / r for r, _ in BIG_ROLES])
    seed_models = [inputs["seed"] / "models" / r for r in inputs["roles"]]
    seed_total, seed_largest = safetensors_stats(seed_models)
    rows = []

    def row(key, label, cmd, model_bytes, largest, n_inputs, cwd=None):
        if key in skip:
            return
        print(f"  {label} …", flush=True)
        m = run_ggmerge(cmd, cwd)
        rows.append(dict(label=label, cmd="ggmerge " + " ".join(map(str, cmd)), model=model_bytes,
                         largest=largest, inputs=n_inputs, **m))
        print(f"    peak RSS {m['maxrss'] / MB:.0f} MB (anon {m['anon'] / MB:.0f}, file {m['file'] / MB:.0f}), "
              f"import baseline {m['baseline'] / MB:.0f} MB, {m['wall']:.1f} s", flush=True)

    row("convert", "convert HF → BF16 GGUF", ["convert", models / "base", "-o", x, "--outtype", "bf16", "--force"],
        base_bytes, base_largest, 1)
    xb, xl = gguf_stats(x)
    row("quantize", "quantize BF16 GGUF → Q4_K_M", ["quantize", "q4_k_m", x, "-o", q, "--force"], xb, xl, 1)
    row("back", "convert BF16 GGUF → HF", ["convert", x, "-o", hf2, "--force"], xb, xl, 1)
    row("task3", "build task_arithmetic, 3 models", ["build", big / "task3.yaml", "-o", work / "out" / "task3", "--force"],
        all3[0] // 3, all3[1], 3)
    row("seed", "build seed recipe (ninja-mini shape)", ["build", inputs["seed"] / "ggmerge.yaml", "-o",
                                                 work / "out" / "seed", "--force"],
        seed_total // len(seed_models), seed_largest, len(seed_models))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| pass | model size | largest tensor | inputs | peak RSS | of which anon / file | baseline "
             "| peak − baseline | ÷ largest tensor | ÷ (largest × inputs) | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["baseline"]
        extra = r["maxrss"] - b
        lines.append(
            f"| {r['label']} | {r['model'] / MB:,.0f} MB | {r['largest'] / MB:.1f} MB | {r['inputs']} "
            f"| {r['maxrss'] / MB:,.0f} MB | {r['anon'] / MB:,.0f} / {r['file'] / MB:,.0f} MB "
            f"| {b / MB:.0f} MB | {extra / MB:,.0f} MB | {extra / r['largest']:.1f}× "
            f"| {extra / (r['largest'] * r['inputs']):.1f}× | {r['wall']:.0f} s |")
    return "\n".join(lines)


def write_section(path: Path, body: str, head: str = "## Memory") -> None:
    """Create or replace only the ``head`` section of BENCHMARKS.md (the other benchmark scripts that own
    one whole section use this too)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    section = head + "\n\n" + body.rstrip() + "\n"
    m = re.search("^" + re.escape(head) + r"\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if m:
        text = text[:m.start()] + section + ("\n" if m.end() < len(text) else "") + text[m.end():]
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


# --- the seed recipe at real shapes (reduced depth): measured peak vs the dry-run estimate ----------

#: real models' widths at 2 layers, so 8 inputs fit on one disk: Mistral-7B (vocab 32000) and Llama-3-8B
#: (vocab 128256: a 525M-element embedding and lm_head, 2.1 GB each in float32)
SHAPES = {
    "7b-2l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                  num_key_value_heads=8),
    "llama3-2l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}
#: prints the dry-run's estimate (bytes) for a recipe, in a process of its own like the build's
ESTIMATE = """import sys
from ggmerge.build import memory_estimate, prepare
p = prepare(sys.argv[1])
print(memory_estimate(p))
"""


def real_shapes(work: Path, names: list[str]) -> list[dict]:
    """Build the seed recipe (examples/ninja-mini's stages) on eight models of each shape; return rows
    with the measured peaks and the dry-run's estimate."""
    from ggmerge.miniature import ROLES, config

    rows = []
    for name in names:
        root = work / name
        cfg = config(**SHAPES[name])
        for i, role in enumerate(ROLES):
            write_streaming(root / "models" / role, cfg, role, 0.0 if i == 0 else 0.02)
        text = (ROOT / "examples" / "ninja-mini" / "ggmerge.yaml").read_text().replace("  miniature: models\n", "")
        if cfg.get("vocab_size", 32000) != 32000:
            # the stand-ins carry Mistral's 32000-piece tokenizer, which cannot describe 128256 rows: merge
            # the token rows as they are (no union), which is what exercises the chunked vocab path
            text = "\n".join(line for line in text.splitlines() if "tokenizer_source" not in line) + "\n"
        recipe = root / "ggmerge.yaml"
        recipe.write_text(text)
        out = root / "out"
        est = subprocess.run([sys.executable, "-c", ESTIMATE, str(recipe)], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if est.returncode:
            raise SystemExit(est.stderr[-3000:])
        estimate = int(est.stdout.strip().splitlines()[-1])
        print(f"  {name}: building …", flush=True)
        m = run_ggmerge(["build", recipe, "-o", out, "--force"])
        total, largest = safetensors_stats([root / "models" / next(iter(ROLES))])
        rows.append(dict(label=name, model=total, largest=largest, estimate=estimate, **m))
        print(f"    anon peak {m['anon'] / MB:,.0f} MB, estimate {estimate / MB:,.0f} MB, "
              f"peak RSS {m['maxrss'] / MB:,.0f} MB, {m['wall']:.0f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def shapes_table(rows: list[dict]) -> str:
    lines = ["| shape | model size | largest tensor (bf16) | peak anonymous | dry-run estimate | estimate / measured "
             "| peak RSS | wall |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['model'] / MB:,.0f} MB | {r['largest'] / MB:,.0f} MB | "
                     f"{r['anon'] / 2**30:.2f} GiB | {r['estimate'] / 2**30:.2f} GiB | {r['estimate'] / r['anon']:.2f} "
                     f"| {r['maxrss'] / 2**30:.2f} GiB | {r['wall']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1gb")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ggmerge-mem"))
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--skip", action="append", default=[], choices=PASSES, help="leave out a pass")
    ap.add_argument("--note", default="", help="markdown added under the table (e.g. an earlier run to compare with)")
    ap.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), metavar="SHAPE",
                    help=f"instead: the seed recipe at real widths, 2 layers ({', '.join(SHAPES)}; all if none "
                         "named): peak anonymous memory against --dry-run's estimate (prints the table)")
    a = ap.parse_args()
    if a.shapes is not None:
        print(shapes_table(real_shapes(a.work / "shapes", a.shapes or sorted(SHAPES))))
        return
    work = a.work / a.size
    print(f"models in {work}", flush=True)
    inputs = make_inputs(work, SIZES[a.size])
    base = torch_baseline()
    rows = passes(work, inputs, set(a.skip))
    tab = table(rows)
    print(tab)
    if a.no_write:
        return
    import numpy
    import torch

    cmds = "\n".join(r["cmd"] for r in rows)
    body = f"""Command: `python tools/bench_memory.py --size {a.size}` (from the repository root)

Each pass runs in its own subprocess; **peak RSS** is its `ru_maxrss` (what the kernel reports, file-backed
pages of memory-mapped files included), split into anonymous (heap, tensors) and file-backed pages by
sampling `/proc/PID/status` every 20 ms. **Baseline** is the peak of a subprocess that only imports every
module the pass imported, in the same order (python + `import torch` alone: {base / MB:.0f} MB). Models are
deterministic random HF Mistral-shaped bf16 checkpoints generated by the script ({json.dumps(SIZES[a.size].big)};
the seed recipe's eight models: {json.dumps(SIZES[a.size].seed)}, vocab 32000 for both). "Model size" is
per input; "largest tensor" is its stored (bf16) size — ggmerge holds a tensor as float32, twice that,
while it works on it. For GGUF inputs both are of the GGUF file's tensors.

Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__},
numpy {numpy.__version__}; {time.strftime('%Y-%m-%d')}.

{tab}
{(chr(10) + a.note + chr(10)) if a.note else ''}
```sh
{cmds}
```
"""
    write_section(ROOT / "BENCHMARKS.md", body)
    print("wrote the ## Memory section of BENCHMARKS.md")


if __name__ == "__main__":
    main()

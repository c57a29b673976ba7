"""Compare ggmerge's merge methods with mergekit itself on tiny random Mistral models.

    python tools/mergekit_compare.py [--venv /tmp/ggmerge-mkvenv] [--workdir DIR] [--keep]

Creates (once) a private virtualenv with a pinned mergekit and torch (the main environment is never
touched), builds tiny Mistral-architecture models (bf16 safetensors + config.json) in a temp dir, runs
mergekit's own ``mergekit-yaml`` command (its click entry point, called in one process of the venv so
Python starts once) for every case, computes the same merges with ``ggmerge.methods`` and
``ggmerge.recipe.params`` here, and prints a table.

Three mergekit modes per case: ``dtype: float32`` (a float32 output, compared bit for bit with
ggmerge's float32 result: the "f32 bit-identical %" column), ``dtype: float32`` + ``out_dtype:
bfloat16`` (mergekit computes in float32 and rounds once, like ggmerge: differences show semantic bugs)
and ``dtype: bfloat16`` (the seed's setting: mergekit then computes task arithmetic in bf16, so small
differences are expected).

Δ is measured in bf16 ulps at max(|mergekit value|, rms of that tensor) — per-element relative error
on values that nearly cancel would be meaningless (see NOTES.md).
Random methods (DARE, DELLA) use the global torch RNG in mergekit and a per-tensor generator in
ggmerge, so their masks cannot match element-wise: they are compared at density 1 (deterministic)
and statistically (kept fraction, L1 ratio, DELLA's keep rate for small vs large magnitudes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from ggmerge.dtypes import round_to
from ggmerge.methods import METHODS, PARAM_KINDS, seeded_generator
from ggmerge.recipe.params import resolve

MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"
N_LAYERS, HIDDEN, INTER, HEADS, KV, VOCAB = 4, 64, 128, 4, 2, 96
LAYER_RE = re.compile(r"\.layers\.(\d+)\.")

DRIVER = r"""
import json, sys
from mergekit.scripts.run_yaml import main
for cfg, out in json.load(open(sys.argv[1])):
    main.main(args=[cfg, out, "--random-seed", "0", "--no-copy-tokenizer",
                    "--no-write-model-card", "--quiet"], standalone_mode=False)
"""


# ------------------------------------------------------------------------------------- setup

def ensure_venv(venv: Path, console: Console) -> Path:
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"]
    if py.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == MERGEKIT.split("==")[1]:
        return py
    console.print(f"creating {venv} and installing {TORCH} {MERGEKIT} (a few minutes)…")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", TORCH, MERGEKIT], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"pip could not install {MERGEKIT} into {venv}:\n{r.stderr[-3000:]}")
    return py


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    hd = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV * hd, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * hd, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        }
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def build_models(root: Path) -> dict[str, Path]:
    """A base and four fine-tunes: base + shared direction·aᵢ + own noise (so task vectors are
    correlated, cos ≈ 0.2–0.6, as real fine-tunes of one base are)."""
    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": N_LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HIDDEN // HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
    }
    g = torch.Generator().manual_seed(1234)
    base, shared = {}, {}
    for name, shape in tensor_shapes().items():
        norm = name.endswith("norm.weight")
        base[name] = (1.0 + 0.05 * torch.randn(shape, generator=g)) if norm else 0.02 * torch.randn(shape, generator=g)
        shared[name] = 0.002 * torch.randn(shape, generator=g)
    paths = {}
    for k, a in enumerate([None, 1.0, 0.7, 1.3, 0.5]):
        name = "base" if a is None else f"m{k}"
        tensors = {n: (t if a is None else t + a * shared[n] + 0.002 * torch.randn(t.shape, generator=g))
                   for n, t in base.items()}
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        save_file({n: t.to(torch.bfloat16).contiguous() for n, t in tensors.items()},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config, indent=1))
        paths[name] = d
    return paths


# ------------------------------------------------------------------------------------- cases

def M(name, **params):
    return {"model": name, **({"parameters": params} if params else {})}


ALL4 = ["m1", "m2", "m3", "m4"]
CASES: list[tuple[str, dict]] = [
    ("linear", {"merge_method": "linear", "models": [M("m1", weight=0.5), M("m2", weight=0.3), M("m3", weight=0.2)]}),
    ("linear (base_model as input)", {"merge_method": "linear", "base_model": "base",
     "models": [M("m1", weight=0.6), M("m2", weight=0.4)], "parameters": {"weight": 0.2}}),
    ("task_arithmetic (chat vector)", {"merge_method": "task_arithmetic", "base_model": "base",
     "models": [M("m1", weight=1.0), M("m2", weight=0.8), M("m3", weight=0.8)]}),
    ("task_arithmetic normalize λ=0.7", {"merge_method": "task_arithmetic", "base_model": "base",
     "models": [M("m1", weight=1.0), M("m2", weight=0.5)], "parameters": {"normalize": True, "lambda": 0.7}}),
    ("ties d=0.5", {"merge_method": "ties", "base_model": "base",
     "models": [M("m1", weight=1.0, density=0.5), M("m2", weight=0.6, density=0.5), M("m3", weight=0.8, density=0.3)]}),
    ("ties gradient density", {"merge_method": "ties", "base_model": "base", "models": [M("m1"), M("m2")],
     "parameters": {"weight": 1.0, "density": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]}}),
    ("breadcrumbs d=0.6 γ=0.05", {"merge_method": "breadcrumbs", "base_model": "base",
     "models": [M("m1", weight=1.0, density=0.6, gamma=0.05), M("m2", weight=0.5, density=0.6, gamma=0.05)]}),
    ("breadcrumbs_ties", {"merge_method": "breadcrumbs_ties", "base_model": "base",
     "models": [M("m1", weight=1.0, density=0.7), M("m2", weight=0.7, density=0.7)]}),
    ("dare_ties d=1", {"merge_method": "dare_ties", "base_model": "base",
     "models": [M("m1", weight=0.5, density=1.0), M("m2", weight=0.5, density=1.0)]}),
    ("della d=1", {"merge_method": "della", "base_model": "base",
     "models": [M("m1", weight=0.5, density=1.0), M("m2", weight=0.8, density=1.0)]}),
    ("model_stock (base + 4)", {"merge_method": "model_stock", "base_model": "base",
     "models": [M("base")] + [M(m) for m in ALL4]}),
    ("model_stock filter_wise", {"merge_method": "model_stock", "base_model": "base",
     "models": [M(m) for m in ALL4[:3]], "parameters": {"filter_wise": True}}),
    ("slerp t filters+gradients", {"merge_method": "slerp", "base_model": "base", "models": [M("base"), M("m1")],
     "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                          {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}),
    ("nuslerp (with base)", {"merge_method": "nuslerp", "base_model": "base",
     "models": [M("m1", weight=0.4), M("m2", weight=0.6)]}),
    ("passthrough scale", {"merge_method": "passthrough", "models": [M("m1", scale=0.5)]}),
    ("sce (select_topk 1)", {"merge_method": "sce", "base_model": "base", "models": [M(m) for m in ALL4[:3]]}),
    ("sce select_topk 0.5", {"merge_method": "sce", "base_model": "base",
     "models": [M("base"), M("m1"), M("m2"), M("m3")], "parameters": {"select_topk": 0.5}}),
    ("sce select_topk gradient", {"merge_method": "sce", "base_model": "base", "models": [M("m1"), M("m2")],
     "parameters": {"select_topk": [0.1, 0.9]}}),
    ("karcher (3 models)", {"merge_method": "karcher", "models": [M("m1"), M("m2"), M("m3")]}),
    ("karcher (base_model as input)", {"merge_method": "karcher", "base_model": "base",
     "models": [M("m1"), M("m4")], "parameters": {"max_iter": 5}}),
    ("arcee_fusion", {"merge_method": "arcee_fusion", "base_model": "base", "models": [M("base"), M("m3")]}),
]
# statistical only: (label, config, float32 output)
RANDOM_CASES = [
    ("dare_ties d=0.7 w=0.5 (seed stage 3)", {"merge_method": "dare_ties", "base_model": "base",
     "models": [M("base"), M("m1", weight=0.5, density=0.7)]}),
    ("dare_linear d=0.3", {"merge_method": "dare_linear", "base_model": "base",
     "models": [M("m1", weight=1.0, density=0.3)]}),
    ("della d=0.5 ε=0.3", {"merge_method": "della", "base_model": "base",
     "models": [M("m1", weight=1.0, density=0.5, epsilon=0.3)]}),
]


# ------------------------------------------------------------------------------------- ggmerge side

# mergekit 0.1.5 computes these in the recipe's dtype; linear and slerp upcast to float32 themselves
NATIVE_DTYPE = {"model_stock", "nuslerp", "passthrough", "sce", "karcher", "arcee_fusion"} | {
    n for n, m in METHODS.items() if m.fn.__class__.__name__ == "partial"}


def ggmerge_merge(cfg: dict, inputs: dict[str, dict[str, torch.Tensor]], seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """What the recipe layer does for a `models:` recipe, written out for this tool.

    ``dtype`` other than float32 is a diagnostic only: it runs our (dtype-agnostic) kernels in
    mergekit's arithmetic to show that what remains in bf16 mode is rounding, not semantics."""
    if cfg["merge_method"] not in NATIVE_DTYPE:
        dtype = torch.float32
    method = METHODS[cfg["merge_method"]]
    base_ref = cfg.get("base_model")
    entries = [(e["model"], e.get("parameters", {})) for e in cfg["models"]]
    if method.base_is_model:
        if base_ref and base_ref not in [r for r, _ in entries]:
            entries.append((base_ref, {}))  # mergekit appends an unlisted base as the last input
        base_ref = None
    else:
        entries = [(r, p) for r, p in entries if r != base_ref]
    glob = cfg.get("parameters", {})
    out = {}
    for name in tensor_shapes():
        m = LAYER_RE.search(name)
        layer = int(m.group(1)) if m else None

        def value(pname, scopes, default):
            for scope in scopes:
                if pname in scope:
                    v = resolve(scope[pname], name, layer, N_LAYERS, kind=PARAM_KINDS.get(pname), key=pname)
                    if v is not None:
                        return v
            return default

        mparams = [{k: value(k, [p, glob], d) for k, d in method.model_params.items()} for _, p in entries]
        params = {k: value(k, [glob], d) for k, d in method.params.items()}
        base = inputs[base_ref][name].to(dtype) if base_ref else None
        models = [inputs[r][name].to(dtype) for r, _ in entries]
        gen = seeded_generator(seed, name) if method.uses_random else None
        out[name] = method(base, models, mparams, params, gen, tensor=name)
    return out


# ------------------------------------------------------------------------------------- measures

def bf16_ulps(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |Δ| in bf16 ulps at max(|ref|, rms(ref)), % of bit-identical bf16 values)."""
    ref = ref.float()
    ours = round_to(ours.float(), torch.bfloat16).float()
    rms = ref.square().mean().sqrt()
    scale = torch.maximum(ref.abs(), rms).clamp(min=torch.finfo(torch.float32).tiny)
    _, exp = torch.frexp(scale)
    ulp = torch.ldexp(torch.ones_like(scale), exp - 8)  # bf16: 8 significant bits
    d = (ours - ref).abs() / ulp
    return d.max().item(), 100.0 * (ours == ref).double().mean().item()


def random_stats(out: dict, inputs: dict, cfg: dict) -> tuple[float, float, float, float]:
    """Over all tensors: kept fraction, L1(out − base)/(w·L1(delta)), keep rate in the smallest and
    largest magnitude quintiles of each row (DELLA ranks per row); entries whose delta is 0 are
    left out (bf16 inputs make many)."""
    entry = [e for e in cfg["models"] if e["model"] != "base"][0]
    w = entry["parameters"]["weight"]
    kept = total = l1_out = l1_ref = 0.0
    lo_k = lo_n = hi_k = hi_n = 0.0
    for name, res in out.items():
        base = inputs["base"][name].float()
        delta = inputs[entry["model"]][name].float() - base
        moved = (res.float() - base)
        nz = delta != 0
        kept += (moved[nz] != 0).sum().item()
        total += nz.sum().item()
        l1_out += moved.abs().sum().item()
        l1_ref += w * delta.abs().sum().item()
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
        mrows = moved.reshape(rows.shape)
        rank = rows.abs().argsort(dim=1).argsort(dim=1).float() / max(1, rows.shape[1] - 1)
        moving = (delta != 0).reshape(rows.shape)  # a zero delta cannot show whether it was kept
        lo, hi = (rank <= 0.2) & moving, (rank >= 0.8) & moving
        lo_k += (mrows[lo] != 0).sum().item(); lo_n += lo.sum().item()
        hi_k += (mrows[hi] != 0).sum().item(); hi_n += hi.sum().item()
    return kept / total, l1_out / l1_ref, lo_k / lo_n, hi_k / hi_n


# ------------------------------------------------------------------------------------- main

def load_output(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "ggmerge-mkvenv")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)
    console = Console()
    py = ensure_venv(args.venv, console)

    tmp = tempfile.TemporaryDirectory(prefix="ggmerge-mkcmp-", dir=args.workdir)
    root = Path(tmp.name)
    paths = build_models(root / "models")
    inputs = {k: load_file(str(p / "model.safetensors")) for k, p in paths.items()}

    def localize(cfg: dict, **extra) -> dict:
        c = json.loads(json.dumps(cfg))
        for e in c["models"]:
            e["model"] = str(paths[e["model"]])
        if "base_model" in c:
            c["base_model"] = str(paths[c["base_model"]])
        return c | extra

    jobs, runs = [], []
    modes = {"f32": {"dtype": "float32"}, "f32→bf16": {"dtype": "float32", "out_dtype": "bfloat16"},
             "bf16": {"dtype": "bfloat16"}}
    for i, (label, cfg) in enumerate(CASES):
        for j, mode in enumerate(modes):
            runs.append((label, mode, cfg, root / f"out{i}-{j}"))
    for i, (label, cfg) in enumerate(RANDOM_CASES):
        runs.append((label, "rnd", cfg, root / f"rnd{i}"))
    for label, mode, cfg, out in runs:
        extra = {"dtype": "float32"} if mode == "rnd" else modes[mode]
        cfg_path = out.with_suffix(".yml")
        cfg_path.write_text(yaml.safe_dump(localize(cfg, **extra), sort_keys=False))
        jobs.append([str(cfg_path), str(out)])
    (root / "jobs.json").write_text(json.dumps(jobs))
    console.print(f"running mergekit on {len(jobs)} recipes…")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([str(py), "-c", DRIVER, str(root / "jobs.json")], env=env, capture_output=True, text=True)
    if r.returncode:
        console.print(r.stderr[-4000:])
        return 1

    version = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                             capture_output=True, text=True).stdout.split()
    table = Table(title=f"ggmerge vs mergekit {version[0]} (torch {version[1]}): max |Δ| in bf16 ulps")
    for col in ("case", "mergekit dtype", "tensors", "max Δ (ulps)", "bit-identical %",
                "max Δ, ggmerge in mergekit's arithmetic"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for label, mode, cfg, out in runs:
        if mode == "rnd":
            continue
        ref = load_output(out)
        ours = ggmerge_merge(cfg, inputs)
        if mode == "f32":  # float32 output: the bits themselves
            same = sum(int((ours[n] == ref[n]).sum()) for n in ours) / sum(t.numel() for t in ours.values())
            mx = max((ours[n] - ref[n]).abs().max().item() for n in ours)
            table.add_row(label, mode, str(len(ours)), f"{mx:.2e} (abs)", f"{100 * same:.3f}", "")
            continue
        stats = [bf16_ulps(ours[n], ref[n]) for n in ours]
        mx = max(s[0] for s in stats)
        same = sum(s[1] * ours[n].numel() for s, n in zip(stats, ours)) / sum(t.numel() for t in ours.values())
        emu = "same as f32"
        if mode == "bf16" and cfg["merge_method"] in NATIVE_DTYPE:
            ours16 = ggmerge_merge(cfg, inputs, dtype=torch.bfloat16)
            emu = f"{max(bf16_ulps(ours16[n], ref[n])[0] for n in ours16):.2f}"
        elif mode == "bf16":
            emu = "(mergekit upcasts)"
        table.add_row(label, mode, str(len(stats)), f"{mx:.2f}", f"{same:.3f}", emu if mode == "bf16" else "")
    console.print(table)

    rt = Table(title="random methods, float32 (masks differ by design; compare statistics)")
    for col in ("case", "impl", "kept fraction", "L1 ratio", "keep rate, smallest 20%", "keep rate, largest 20%"):
        rt.add_column(col, justify="left" if col in ("case", "impl") else "right")
    for label, mode, cfg, out in runs:
        if mode != "rnd":
            continue
        ref = load_output(out)
        for impl, res in (("mergekit", ref), ("ggmerge", ggmerge_merge(cfg, inputs))):
            k, l1, lo, hi = random_stats(res, inputs, cfg)
            rt.add_row(label, impl, f"{k:.4f}", f"{l1:.4f}", f"{lo:.4f}", f"{hi:.4f}")
    console.print(rt)
    if args.keep:
        tmp._finalizer.detach()  # noqa: SLF001 - keep the folder for inspection
        console.print(f"kept {root}")
    else:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

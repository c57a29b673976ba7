"""The chunked evaluator against the whole-tensor formulas of ggmerge.methods.

A tensor evaluated in row chunks must give the same bits as the same graph evaluated on whole tensors
(the reference path, taken for every tensor that fits in one chunk) for every row-local method, with any
chunk size and thread count. Methods with a per-tensor statistic (Model Stock's cosines, DARE's L1
rescale) sum it in float64 over the chunks instead of float32 over the tensor: the same masks, values
within float32 rounding of the statistic.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ggmerge.evaluator as evaluator
from ggmerge.build import build, prepare
from ggmerge.evaluator import Evaluator, chunk_bounds
from ggmerge.miniature import ROLES, config, write_model

SMALL = config(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=1)
WHOLE = 1 << 40  # every tensor in one chunk: the reference path
CHUNK = 1000     # 64-wide rows: 15 rows a chunk, 3 rows in the last chunk of a 192-row tensor

NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.embed_tokens.weight", "model.norm.weight"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluator")
    for role in ROLES:
        write_model(root / "models" / role, role, SMALL)
    return root


def _recipe(root: Path, name: str, text: str) -> Path:
    p = root / f"{name}.yaml"
    p.write_text(text)
    return p


B, I, A, W, K, S, L, N = (f"models/{r}" for r in ROLES)

# row-local graphs: chunked == whole, bit for bit
EXACT = {
    "shared_prefix": f"""
name: cv1
merge_method: task_arithmetic
base_model: {B}
models:
  - {{model: {A}, parameters: {{weight: 1.0}}}}
  - {{model: {I}, parameters: {{weight: 0.8}}}}
  - {{model: {W}, parameters: {{weight: 0.8}}}}
dtype: float32
---
name: cv2
merge_method: task_arithmetic
base_model: {B}
models:
  - {{model: {A}, parameters: {{weight: 1.0}}}}
  - {{model: {I}, parameters: {{weight: 0.8}}}}
  - {{model: {K}, parameters: {{weight: 0.8}}}}
dtype: bfloat16
---
merge_method: linear
models:
  - {{model: cv1, parameters: {{weight: 0.3}}}}
  - {{model: cv2, parameters: {{weight: 0.7}}}}
dtype: float32
""",
    "ties_dense": f"""
merge_method: ties
base_model: {B}
models:
  - {{model: {W}, parameters: {{weight: 0.5}}}}
  - {{model: {K}, parameters: {{weight: [0.2, 0.9]}}}}
  - {{model: {S}, parameters: {{weight: 0.4}}}}
dtype: float32
""",
    "dare_linear_two_models": f"""
merge_method: dare_linear
base_model: {B}
models:
  - {{model: {W}, parameters: {{weight: 0.5, density: 0.6}}}}
  - {{model: {K}, parameters: {{weight: 0.5, density: 0.3}}}}
parameters: {{rescale: false}}
dtype: float32
ggmerge: {{seed: 7}}
""",
    "model_stock_filter_wise": f"""
merge_method: model_stock
base_model: {B}
models:
  - model: {W}
  - model: {K}
  - model: {S}
parameters: {{filter_wise: true}}
dtype: float32
""",
    "passthrough": f"""
merge_method: passthrough
models:
  - {{model: {L}, parameters: {{scale: 0.75}}}}
dtype: float32
""",
}

# graphs with a per-tensor statistic: the same masks, values within float32 rounding
STATS = {
    "model_stock": f"""
merge_method: model_stock
base_model: {B}
models:
  - model: {W}
  - model: {K}
  - model: {S}
  - model: {L}
dtype: float32
""",
    "dare_ties_two_models": f"""
merge_method: dare_ties
base_model: {N}
models:
  - {{model: {W}, parameters: {{weight: 0.5, density: 0.7}}}}
  - {{model: {K}, parameters: {{weight: 0.3, density: 0.5}}}}
dtype: float32
""",
}


def _both(models: Path, key: str, text: str):
    p = prepare(_recipe(models, key, text))
    return p, Evaluator(p.recipe, p.inputs, chunk_elems=CHUNK), Evaluator(p.recipe, p.inputs, chunk_elems=WHOLE)


@pytest.mark.parametrize("key", sorted(EXACT))
def test_row_local_methods_chunked_equal_whole(models, key):
    p, chunked, whole = _both(models, key, EXACT[key])
    try:
        for name in NAMES:
            assert len(chunk_bounds(tuple(p.infos[-1].jobs[name].shape), CHUNK)) > 1 or name == "model.norm.weight"
            got, want = chunked.tensor(name), whole.tensor(name)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name
            # streamed in row blocks: the same rows again
            rows = torch.cat([t for _, _, t in chunked.chunks(name)])
            assert torch.equal(rows.reshape(want.shape), want), name
    finally:
        p.close()


@pytest.mark.parametrize("key", sorted(STATS))
def test_statistics_methods_chunked_match_whole(models, key):
    p, chunked, whole = _both(models, key, STATS[key])
    try:
        base = p.inputs.sources[p.recipe.output.base]
        for name in NAMES:
            got, want = chunked.tensor(name), whole.tensor(name)
            ref = base.load(name)
            if key.startswith("dare"):  # the same entries kept (the masks are drawn in the same order)
                assert torch.equal(got == ref, want == ref), name
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    finally:
        p.close()


def test_intermediate_out_dtype_rounds_like_mergekit_multi(models):
    """mergekit-multi saves an intermediate stage in its out_dtype: later stages read those values."""
    text = f"""
name: cv
merge_method: task_arithmetic
base_model: {B}
models:
  - {{model: {A}, parameters: {{weight: 1.0}}}}
  - {{model: {I}, parameters: {{weight: 0.8}}}}
dtype: float32
out_dtype: bfloat16
---
merge_method: linear
models:
  - {{model: cv, parameters: {{weight: 1.0}}}}
dtype: float32
"""
    p = prepare(_recipe(models, "out_dtype", text))
    try:
        ev = Evaluator(p.recipe, p.inputs)
        name = "model.layers.0.mlp.up_proj.weight"
        load = lambda r: p.inputs.sources[r].load(name)
        exact = load(A) + 0.8 * (load(I) - load(B))
        stage = ev.tensor(name, stage="cv")
        assert torch.equal(stage, stage.to(torch.bfloat16).float())
        assert not torch.equal(stage, exact)
        assert torch.equal(ev.tensor(name), stage)
    finally:
        p.close()


def _shards(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def test_build_bytes_independent_of_threads(models, tmp_path, monkeypatch):
    """Small chunks and caches force the multi-pass paths; one thread and three give the same files."""
    monkeypatch.setattr(evaluator, "CHUNK_ELEMS", CHUNK)
    monkeypatch.setattr(evaluator, "CACHE_BUDGET", 20_000)
    text = EXACT["shared_prefix"].replace("merge_method: linear", "merge_method: dare_ties\nbase_model: cv1")
    text = text.replace("  - {model: cv1, parameters: {weight: 0.3}}\n", "")
    text = text.replace("{weight: 0.7}", "{weight: 0.7, density: 0.6}")
    recipe = _recipe(models, "threads", text)
    one = build(str(recipe), str(tmp_path / "one"), threads=1)
    three = build(str(recipe), str(tmp_path / "three"), threads=3)
    for f in sorted(one.glob("*.safetensors")):
        assert f.read_bytes() == (three / f.name).read_bytes()
    # and the output is the whole-tensor evaluation where that is exact (a row-local tensor)
    p = prepare(recipe)
    try:
        name = "model.layers.0.mlp.up_proj.weight"
        whole = Evaluator(p.recipe, p.inputs, chunk_elems=WHOLE).tensor(name)
        got = _shards(one)[name].float()
        torch.testing.assert_close(got, whole.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)
    finally:
        p.close()


def test_cache_budget_trades_memory_for_recomputation(models):
    """Values read by several passes are kept only within the budget; without one everything is
    recomputed, and the result is the same."""
    p = prepare(_recipe(models, "ms_est", STATS["model_stock"]))
    try:
        name = "model.embed_tokens.weight"
        lean = Evaluator(p.recipe, p.inputs, chunk_elems=CHUNK, cache_budget=0)
        roomy = Evaluator(p.recipe, p.inputs, chunk_elems=CHUNK)
        assert lean._run(name, None).kept_bytes() == 0
        kept = roomy._run(name, None).kept_bytes()
        assert kept > 0
        assert roomy.peak_bytes(name) - lean.peak_bytes(name) == kept
        assert torch.equal(lean.tensor(name), roomy.tensor(name))
    finally:
        p.close()


def test_chunk_bounds_are_whole_rows_and_cover_the_tensor():
    assert chunk_bounds((10,), 4) == [(0, 10)]
    assert chunk_bounds((3, 4), 100) == [(0, 3)]
    b = chunk_bounds((1000, 64), 1000)
    assert b[0] == (0, 15) and b[-1][1] == 1000
    assert all(r1 - r0 == 15 for r0, r1 in b[:-1]) and all(a[1] == c[0] for a, c in zip(b, b[1:]))
    assert chunk_bounds((7, 5000), 1000) == [(r, r + 1) for r in range(7)]  # rows never split

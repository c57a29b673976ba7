"""Recipe forms beyond the seed: mergekit `slices` (frankenmerges and per-slice merges), tokenizer
sources, and parameter precedence — each checked against the tensors it must produce."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ggmerge.build import build
from ggmerge.miniature import config, write_model

CFG = config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair")
    out = {}
    for role in ("Mistral-7B-v0.1", "Antler-7B", "Ninja-v1-RP"):
        write_model(root / role, role, CFG)
        out[role] = root / role
    return out


def _t(folder: Path, name: str) -> torch.Tensor:
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            if name in h.keys():
                return h.get_tensor(name).float()
    raise KeyError(name)


def test_passthrough_slices_stack_layers_from_two_models(pair, tmp_path):
    a, b = pair["Antler-7B"], pair["Ninja-v1-RP"]
    recipe = tmp_path / "franken.yaml"
    recipe.write_text(f"""
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [2, 4]}}]
merge_method: passthrough
dtype: bfloat16
""")
    out = build(str(recipe), str(tmp_path / "out"))
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    for i, (src, j) in enumerate([(a, 0), (a, 1), (a, 2), (b, 2), (b, 3)]):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(_t(out, f"model.layers.{i}.{suffix}"), _t(src, f"model.layers.{j}.{suffix}"))
    # embeddings from the first slice's model, final norm and lm_head from the last slice's (mergekit)
    assert torch.equal(_t(out, "model.embed_tokens.weight"), _t(a, "model.embed_tokens.weight"))
    assert torch.equal(_t(out, "model.norm.weight"), _t(b, "model.norm.weight"))
    assert torch.equal(_t(out, "lm_head.weight"), _t(b, "lm_head.weight"))


def test_slice_merge_with_shifted_layer_ranges_and_gradient(pair, tmp_path):
    a, b = pair["Antler-7B"], pair["Ninja-v1-RP"]
    recipe = tmp_path / "slerp.yaml"
    recipe.write_text(f"""
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2]}}
      - {{model: {b}, layer_range: [2, 4]}}
merge_method: linear
parameters:
  weight: 0.5
dtype: float32
""")
    out = build(str(recipe), str(tmp_path / "out"))
    for i in range(2):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        want = (0.5 * _t(a, f"model.layers.{i}.mlp.up_proj.weight") + 0.5 * _t(b, f"model.layers.{i + 2}.mlp.up_proj.weight"))
        torch.testing.assert_close(_t(out, name), want, rtol=0, atol=1e-6)


def test_parameter_precedence_and_gradients(pair, tmp_path):
    """Model entry > stage `parameters`; a gradient interpolates over layers; a filter picks tensors."""
    base, a = pair["Mistral-7B-v0.1"], pair["Antler-7B"]
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(f"""
merge_method: task_arithmetic
base_model: {base}
parameters:
  weight: 0.1
models:
  - model: {a}
    parameters:
      weight:
        - filter: mlp
          value: [0.0, 1.0]
        - value: 0.5
dtype: float32
""")
    out = build(str(recipe), str(tmp_path / "out"))
    for layer, w in ((0, 0.0), (1, 1 / 3), (3, 1.0)):
        n = f"model.layers.{layer}.mlp.gate_proj.weight"
        B, A = _t(base, n), _t(a, n)
        torch.testing.assert_close(_t(out, n), B + torch.tensor(w, dtype=torch.float32) * (A - B), rtol=1e-6, atol=1e-6)
    n = "model.layers.2.self_attn.o_proj.weight"
    torch.testing.assert_close(_t(out, n), _t(base, n) + 0.5 * (_t(a, n) - _t(base, n)), rtol=1e-6, atol=1e-6)


def test_stages_may_be_written_in_any_order_and_cycles_are_named(pair, tmp_path):
    from ggmerge.errors import GGMergeError
    from ggmerge.recipe.schema import parse_recipe

    base, a, b = pair["Mistral-7B-v0.1"], pair["Antler-7B"], pair["Ninja-v1-RP"]
    text = f"""
merge_method: linear
models:
  - model: later
    parameters: {{weight: 1.0}}
---
name: later
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
"""
    r = parse_recipe(text, tmp_path / "r.yaml")
    assert [s.label for s in r.stages] == ["later", "output"]
    cyc = f"""
name: x
merge_method: linear
models: [{{model: y, parameters: {{weight: 1}}}}]
---
name: y
merge_method: linear
models: [{{model: x, parameters: {{weight: 1}}}}]
---
merge_method: linear
models: [{{model: x, parameters: {{weight: 1}}}}, {{model: {b}, parameters: {{weight: 1}}}}]
"""
    with pytest.raises(GGMergeError, match="stage cycle: output -> x -> y -> x"):
        parse_recipe(cyc, tmp_path / "c.yaml")

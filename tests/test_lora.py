"""``model+lora`` references (sources/lora.py): a PEFT LoRA adapter merged into a model as it streams.

Checked against PEFT's merge written out independently here (W + (B·A)·alpha/r, embedding Δ = (B·A)ᵀ,
rank-stabilised alpha/√r, per-module rank/alpha patterns, modules_to_save) and, where mergekit is
installed, against mergekit 0.1.5 itself (which merges with PEFT and saves a copy): bit for bit.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import mergekit_ref
from ggmerge.build import build
from ggmerge.errors import GGMergeError
from ggmerge.recipe.schema import parse_recipe
from ggmerge.sources import open_source
from models import make_lora_adapter, make_tiny_mistral

ADAPTER = dict(embed=True, modules_to_save=("lm_head",), alpha=16, r=4, use_rslora=True,
               rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0})


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_mistral(root / "base", seed=0, vocab=1000)
    return root, base, make_lora_adapter(root / "adapter", base, **ADAPTER)


def expected_merge(base, adapter) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload, by hand: Linear W += Δ (float32 Δ, one rounding), Embedding
    W + Δ.to(bf16), modules_to_save replaced."""
    w = load_file(str(base / "model.safetensors"))
    a = load_file(str(adapter / "adapter_model.safetensors"))
    out = dict(w)
    for name, t in w.items():
        module = name[: -len(".weight")]
        key = f"base_model.model.{module}"
        if f"{key}.lora_A.weight" in a:
            A, B = a[f"{key}.lora_A.weight"], a[f"{key}.lora_B.weight"]
            r = A.shape[0]
            alpha = 3.0 if module.endswith("q_proj") else 16
            out[name] = (t.float() + (B @ A) * (alpha / math.sqrt(r))).to(t.dtype)
        elif f"{key}.lora_embedding_A" in a:
            A, B = a[f"{key}.lora_embedding_A"], a[f"{key}.lora_embedding_B"]
            delta = ((B @ A).T * (16 / math.sqrt(4))).to(t.dtype)
            out[name] = (t.float() + delta.float()).to(t.dtype)
        elif f"base_model.model.{name}" in a:
            out[name] = a[f"base_model.model.{name}"].to(t.dtype)
    return out


def _recipe(root, text):
    p = root / "r.yaml"
    p.write_text(text)
    return p


def test_lora_source_is_peft_merge(lora_model):
    root, base, adapter = lora_model
    src = open_source(f"{base}+{adapter}")
    want = expected_merge(base, adapter)
    assert src.changed() == sorted(
        ["lm_head.weight", "model.embed_tokens.weight"]
        + [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"])
    for name in src.names():
        assert torch.equal(src.load(name), want[name].float()), name
        # row reads (the evaluator's chunks) are rows of the same merged tensor, in the stored dtype
        rows = src.read_rows(name, 1, 3)
        assert rows.dtype == torch.bfloat16 and torch.equal(rows, want[name][1:3]), name


def test_lora_build_matches_peft_and_forms_parse(lora_model, tmp_path):
    root, base, adapter = lora_model
    r = _recipe(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\n")
    out = build(str(r), str(tmp_path / "out"))
    got = load_file(str(next(out.glob("*.safetensors"))))
    want = expected_merge(base, adapter)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    # mergekit's expanded ModelReference form means the same
    st = parse_recipe(f"merge_method: passthrough\nmodels:\n  - model: {{model: {{path: {base}}}, "
                      f"lora: {{path: {adapter}}}}}\n", tmp_path / "x.yaml").output
    assert st.models[0].ref == f"{base}+{adapter}"


def test_lora_refusals(lora_model, tmp_path):
    root, base, adapter = lora_model
    import json
    import shutil
    for key, value, msg in (("use_dora", True, "DoRA adapters are not supported"),
                            ("peft_type", "IA3", "peft_type IA3 is not a LoRA"),
                            ("r", 8, "LoRA rank 4 in the file, 8 in adapter_config.json")):
        bad = tmp_path / f"bad_{key}"
        shutil.copytree(adapter, bad)
        cfg = json.loads((bad / "adapter_config.json").read_text())
        cfg[key] = value
        if key == "r":
            cfg["rank_pattern"] = {}
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(GGMergeError, match=msg):
            open_source(f"{base}+{bad}")
    with pytest.raises(GGMergeError, match="one '\\+'"):
        parse_recipe(f"merge_method: passthrough\nmodels: [{base}+{adapter}+x]\n", tmp_path / "y.yaml")


def test_lora_equals_mergekit(lora_model, tmp_path):
    mergekit_ref.require()
    root, base, adapter = lora_model
    r = _recipe(tmp_path, f"merge_method: linear\ndtype: float32\nout_dtype: bfloat16\nmodels:\n"
                          f"  - model: {base}+{adapter}\n    parameters: {{weight: 1.0}}\n"
                          f"  - model: {base}\n    parameters: {{weight: 0.5}}\n")
    err, = mergekit_ref.run([(r, tmp_path / "mk", False, ["--lora-merge-cache", str(tmp_path / "cache")])],
                            tmp_path / "work")
    assert err is None, err
    ref = mergekit_ref.load_output(tmp_path / "mk")
    out = build(str(r), str(tmp_path / "gg"))
    got = load_file(str(next(out.glob("*.safetensors"))))
    assert set(got) == set(ref)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n

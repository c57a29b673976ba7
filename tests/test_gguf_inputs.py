"""A quantized GGUF as a merge input: the real SmolLM2-135M Q4_1 file (GPT-2 BPE vocabulary, tied
embeddings, GQA 9/3, 576-wide rows) merged with an HF model in one recipe."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from models import smollm2_path

from ggmerge.build import build
from ggmerge.convert.gguf_to_hf import convert_gguf
from ggmerge.sources import open_source

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_pair(tmp_path_factory):
    """The GGUF, and an HF copy of it with every weight nudged (a 'fine-tune' of the quantized model)."""
    root = tmp_path_factory.mktemp("smol")
    gguf_path = smollm2_path()
    hf = convert_gguf(gguf_path, root / "smol-hf", dtype="f32", progress=False)
    from safetensors.torch import load_file, save_file

    files = sorted(hf.glob("*.safetensors"))
    for f in files:
        t = load_file(str(f))
        g = torch.Generator().manual_seed(0)
        save_file({k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous() for k, v in t.items()}, str(f),
                  metadata={"format": "pt"})
    return root, gguf_path, hf


def test_linear_merge_of_a_q4_1_gguf_and_an_hf_model(smol_pair, tmp_path):
    root, gguf_path, hf = smol_pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: linear\n"
        f"models:\n  - model: {gguf_path}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {hf}\n    parameters: {{weight: 0.5}}\n"
        "dtype: float32\ntokenizer_source: base\n" f"base_model: {gguf_path}\n")
    out = build(str(recipe), str(tmp_path / "out"))
    merged = open_source(out)
    a, b = open_source(gguf_path), open_source(hf)
    try:
        assert "lm_head.weight" not in merged.names()            # tied stays tied
        assert merged.config()["tie_word_embeddings"] is True
        assert merged.config()["num_key_value_heads"] == 3
        for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.q_proj.weight",
                     "model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight"):
            want = 0.5 * a.load(name) + 0.5 * b.load(name)   # GGUF dequantized + un-permuted by the source
            torch.testing.assert_close(merged.load(name), want, rtol=0, atol=1e-6)
    finally:
        for s in (merged, a, b):
            s.close()
    # the merged tokenizer is the GGUF's BPE vocabulary, written as HF files that llama.cpp agrees with
    from transformers import AutoTokenizer

    from ggmerge.llamacpp import load

    tok = AutoTokenizer.from_pretrained(str(out))
    text = "Hello, world! こんにちは 123"
    ref = load(gguf_path, vocab_only=True)
    assert tok(text)["input_ids"] == ref.tokenize(text.encode(), add_bos=False, special=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 49152


def test_merged_model_converts_and_runs_in_llama_cpp(smol_pair, tmp_path):
    root, gguf_path, hf = smol_pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {gguf_path}\n"
        f"models:\n  - model: {hf}\n    parameters: {{weight: 0.3}}\n")
    out = build(str(recipe), str(tmp_path / "out"))
    from ggmerge.quantize import quantize

    q = quantize("q8_0", str(out))
    from ggmerge.llamacpp import load

    llm = load(q, n_ctx=128)
    try:
        res = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
        assert res["usage"]["completion_tokens"] > 0
        assert np.isfinite(np.array(llm.scores[: llm.n_tokens])).all()
    finally:
        llm.close()

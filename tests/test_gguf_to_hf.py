"""GGUF → HF on the real SmolLM2-135M Q4_1 GGUF, judged by the two real consumers: transformers loads
the folder, and its logits and tokenization agree with llama.cpp's on the original file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ggmerge.arch import llama
from ggmerge.convert.gguf_to_hf import convert_gguf
from ggmerge.dtypes import round_trip
from ggmerge.sources import GGUFSource
from models import smollm2_path

llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    "The capital of France is Paris. In 1889, the Eiffel Tower was built for the World's Fair.",
    "def add(a, b):\n    return a + b  # 12345 + 67890 = 80235\n\n\n\tindented\r\nline",
    "悠人「おはよう!」(リビングに降りてきた悠人は桜に元気よくあいさつする)",
    "  leading spaces, ÜBER-naïve café 😀🚀, $3.14159 and 1,000,000.",
]


def llama_cpp_model(path, **kw):
    """llama.cpp on its plain CPU kernels (see :mod:`ggmerge.llamacpp` for why)."""
    from ggmerge.llamacpp import load

    kw.setdefault("f32_cache", False)
    return load(path, **kw)


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    # F32 KV cache: llama.cpp's default F16 cache alone moves logits by ~1e-3 (see shared NOTES)
    llm = llama_cpp_model(path, n_ctx=256, logits_all=True, type_k=0, type_v=0, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module")
def smol_src():
    src = GGUFSource(smollm2_path())
    yield src
    src.close()


@pytest.fixture(scope="module")
def smol_f32_hf(tmp_path_factory):
    return convert_gguf(smollm2_path(), tmp_path_factory.mktemp("smol") / "hf-f32", dtype="f32", progress=False)


@pytest.fixture(scope="module")
def smol_f32_gguf(tmp_path_factory):
    """The same model as an F32 GGUF: every tensor of the original dequantized by gguf-py and written
    by gguf-py's writer in the GGUF layout (nothing of ours involved), metadata copied verbatim."""
    import gguf

    src = smollm2_path()
    out = tmp_path_factory.mktemp("smol") / "smol-f32.gguf"
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(out), "llama")
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            w.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub)
    for t in reader.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_folder_layout_and_config(smol_f32_hf, smol_src):
    names = sorted(p.name for p in smol_f32_hf.iterdir())
    assert "config.json" in names and "generation_config.json" in names and "tokenizer.json" in names
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    cfg = json.loads((smol_f32_hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert cfg["torch_dtype"] == "float32"
    gen = json.loads((smol_f32_hf / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    with safe_open(str(smol_f32_hf / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(smol_src.names())
        for name in ("model.layers.4.self_attn.k_proj.weight", "model.embed_tokens.weight"):
            assert torch.equal(f.get_tensor(name), smol_src.load(name))  # f32 output keeps values exactly


def test_tokenizer_encodes_like_llama_cpp(smol_f32_hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_f32_hf)
    ref = llama_cpp_model(smollm2_path(), vocab_only=True)
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref.tokenize(text.encode(), add_bos=True, special=False), text
    chat = "<|im_start|>user\nこんにちは<|im_end|>\n<|im_start|>assistant\n"
    assert tok(chat)["input_ids"] == ref.tokenize(chat.encode(), add_bos=True, special=True)
    # the chat template travels from GGUF metadata into tokenizer_config.json
    assert tok.chat_template == ref.metadata["tokenizer.chat_template"]


@pytest.mark.slow
def test_logits_match_llama_cpp(smol_f32_hf, smol_f32_gguf):
    """transformers on our HF folder vs llama.cpp on the same weights in GGUF layout.

    If Q/K were not un-permuted exactly, RoPE would rotate the wrong pairs and the logits diverge
    (measured below: the same model with Q/K left in GGUF layout is off by ~0.9 × max|logit|).
    """
    from transformers import AutoModelForCausalLM

    ids = llama_cpp_model(smollm2_path(), vocab_only=True).tokenize(TEXTS[0].encode(), add_bos=True)
    model = AutoModelForCausalLM.from_pretrained(smol_f32_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    scale = float(np.abs(ours).max())

    exact = llama_cpp_logits(smol_f32_gguf, ids)
    rel_f32 = float(np.abs(exact - ours).max()) / scale
    quant = llama_cpp_logits(smollm2_path(), ids)
    rel_q41 = float(np.abs(quant - ours).max()) / scale
    # negative control: put Q/K back into the GGUF layout
    heads = {"num_attention_heads": 9, "num_key_value_heads": 3}
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = llama.heads_for_permute(name, heads)
            if n:
                p.copy_(llama.permute(p.clone(), n))
        wrong = model(torch.tensor([ids])).logits[0].numpy()
    rel_wrong = float(np.abs(wrong - ours).max()) / scale
    print(f"\nmax|Δ|/max|logit| vs llama.cpp: F32 GGUF {rel_f32:.2e}, original Q4_1 {rel_q41:.2e} "
          f"(llama.cpp quantizes activations to Q8_1 for Q4_1 matmuls); Q/K left permuted {rel_wrong:.2f}")
    assert rel_f32 < 1e-4
    assert (exact.argmax(-1) == ours.argmax(-1)).all()
    assert rel_q41 < 0.1 and (quant.argmax(-1) == ours.argmax(-1)).mean() >= 0.9
    assert rel_wrong > 0.3


@pytest.mark.slow
def test_bf16_sharded_conversion(tmp_path, smol_f32_hf, smol_src):
    from transformers import AutoModelForCausalLM

    out = convert_gguf(smollm2_path(), tmp_path / "hf-bf16", max_shard_bytes=100e6, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3 and (out / "tokenizer.json").is_file()
    src = smol_src
    assert index["metadata"]["total_size"] == sum(2 * torch.Size(src.shape(n)).numel() for n in src.names())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        with safe_open(str(out / index["weight_map"][name]), framework="pt") as f:
            t = f.get_tensor(name)
        assert t.dtype == torch.bfloat16 and torch.equal(t.float(), round_trip(src.load(name), torch.bfloat16))
    ids = [1, 504, 3575, 282, 4649, 314, 7042, 30]
    with torch.no_grad():
        bf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(torch.tensor([ids])).logits[0]
        f32 = AutoModelForCausalLM.from_pretrained(smol_f32_hf, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    rel = float((bf - f32).abs().max() / f32.abs().max())
    print(f"\nbf16 vs f32 HF output: max|Δ|/max|logit| = {rel:.2e}")
    assert rel < 0.05 and (bf.argmax(-1) == f32.argmax(-1)).float().mean() >= 0.85

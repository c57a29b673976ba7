"""``ggmerge quantize`` on whole files, against llama.cpp's own ``llama_model_quantize``.

The same input quantized by both must give the same tensor names, types and bytes — and, since
we copy the metadata the way llama.cpp does, the same file byte for byte. The outputs must load in
llama-cpp-python and generate the same greedy tokens as llama.cpp's file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from ggmerge.convert.quants.ftypes import parse_ftype
from ggmerge.errors import GGMergeError
from ggmerge.quantize import quantized_path, latest_build_output, quantize

llama_cpp = pytest.importorskip("llama_cpp")

from models import llama_logits, load_llama  # noqa: E402  (tests/ is on sys.path)
from test_policy import llama_quantize, write_tiny_gguf  # noqa: E402

#: 8 layers of 256-wide rows: the Q4_K_M/Q5_K_M "more bits" pattern shows (layers 0, 3, 6, 7), GQA 4
STD = dict(n_layer=8, n_embd=256, n_ff=512, n_head=4, n_head_kv=1)
#: 96-wide rows and n_ff 80: every K-quant falls back (to Q4_0/Q5_0/Q5_1/Q8_0, ffn_down to F16), tied
ODD = dict(n_layer=4, n_embd=96, n_ff=80, n_head=3, n_head_kv=1, tied=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("qsrc")
    return {
        "F16": write_tiny_gguf(d / "std.F16.gguf", dtype=QType.F16, seed=1, **STD),
        "BF16": write_tiny_gguf(d / "std.BF16.gguf", dtype=QType.BF16, seed=1, **STD),
        "odd": write_tiny_gguf(d / "odd.F16.gguf", dtype=QType.F16, seed=2, **ODD),
    }


def assert_same_file(ours: Path, ref: Path) -> None:
    """Same tensors, types and bytes (naming each tensor that differs), then the whole file."""
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    assert [(t.name, t.tensor_type.name) for t in a.tensors] == [(t.name, t.tensor_type.name) for t in b.tensors]
    differ = []
    for x, y in zip(a.tensors, b.tensors):
        bx, by = np.asarray(x.data).view(np.uint8).reshape(-1), np.asarray(y.data).view(np.uint8).reshape(-1)
        if not np.array_equal(bx, by):
            differ.append(f"{x.name} ({x.tensor_type.name}: {np.count_nonzero(bx != by)}/{bx.size} bytes)")
    assert not differ, "tensor bytes differ from llama.cpp's: " + ", ".join(differ)
    ka = [(k, f.types, f.contents()) for k, f in a.fields.items()]
    kb = [(k, f.types, f.contents()) for k, f in b.fields.items()]
    assert ka == kb
    assert ours.read_bytes() == ref.read_bytes()


def greedy(path: Path, prompt: str, n: int = 6) -> tuple[list[int], np.ndarray]:
    """n greedy tokens after ``prompt`` and the logits of the first step, from llama-cpp-python
    (through ``models.load_llama``: F32 KV cache, and no AMX repacking, which segfaults here)."""
    llm = load_llama(path, n_ctx=128, n_threads=1)
    try:
        toks = llm.tokenize(prompt.encode())
        first = llama_logits(llm, toks)[-1]
        out = []
        for tok in llm.generate(toks, temp=0.0, reset=True):
            out.append(int(tok))
            if len(out) == n:
                break
        return out, first
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("src", ["F16", "BF16"])
@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q6_K", "Q8_0", "Q3_K_M", "Q5_K_S", "Q2_K"])
def test_same_file_as_llama_quantize(sources, src, qtype, tmp_path):
    ours = quantize(qtype, str(sources[src]), str(tmp_path / f"ours.{qtype}.gguf"))
    ref = llama_quantize(sources[src], tmp_path / f"ref.{qtype}.gguf", parse_ftype(qtype).ftype)
    assert_same_file(ours, ref)


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q2_K", "Q5_K_M"])
def test_fallback_widths_same_file_and_logged(sources, qtype, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ggmerge.quantize"):
        ours = quantize(qtype, str(sources["odd"]), str(tmp_path / "ours.gguf"))
    ref = llama_quantize(sources["odd"], tmp_path / "ref.gguf", parse_ftype(qtype).ftype)
    assert_same_file(ours, ref)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors}
    assert types["blk.0.ffn_down.weight"] == QType.F16  # 80 columns: not even a multiple of 32
    # every tensor whose row length forced a fallback is named in a warning
    for name, t in types.items():
        if name.endswith("ffn_down.weight") or name.endswith("attn_q.weight"):
            assert any(m.startswith(name + ":") for m in warned), name


@pytest.mark.slow
def test_quantized_file_loads_and_generates_like_llama_cpps(sources, tmp_path):
    ours = quantize("q4_k_m", str(sources["F16"]), str(tmp_path / "ours.gguf"))
    ref = llama_quantize(sources["F16"], tmp_path / "ref.gguf", parse_ftype("Q4_K_M").ftype)
    toks, logits = greedy(ours, "ab cd")
    rtoks, rlogits = greedy(ref, "ab cd")
    assert len(toks) == 6 and np.isfinite(logits).all()
    assert toks == rtoks
    np.testing.assert_array_equal(logits, rlogits)


def _smollm2() -> Path:
    from models import smollm2_path

    return smollm2_path()


@pytest.mark.slow
def test_requantize_real_smollm2(tmp_path, caplog):
    src = _smollm2()
    with caplog.at_level(logging.WARNING, logger="ggmerge.quantize"):
        ours = quantize("Q4_K_M", str(src), str(tmp_path / "SmolLM2.Q4_K_M.gguf"))
    msgs = [r.getMessage() for r in caplog.records]
    assert any("requantizing loses quality" in m for m in msgs)
    assert any("576 columns are not a multiple of Q4_K's block 256" in m for m in msgs)
    ref = llama_quantize(src, tmp_path / "ref.gguf", parse_ftype("Q4_K_M").ftype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors}
    # the real 576-wide rows take llama.cpp's fallbacks; token_embd (tied, already Q8_0) is copied
    assert types["blk.10.attn_q.weight"] == QType.Q5_0 and types["token_embd.weight"] == QType.Q8_0
    assert types["blk.0.attn_v.weight"] == QType.Q8_0 and types["blk.0.ffn_down.weight"] == QType.Q6_K
    assert_same_file(ours, ref)
    toks, _ = greedy(ours, "The capital of France is", n=8)
    rtoks, _ = greedy(ref, "The capital of France is", n=8)
    assert toks == rtoks and len(toks) == 8


# --- the verb's plumbing ---------------------------------------------------------------------------

def test_refuses_to_overwrite_unless_forced(sources, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(GGMergeError, match="already exists"):
        quantize("Q8_0", str(sources["odd"]), str(out))
    assert out.read_bytes() == b"keep me"
    quantize("Q8_0", str(sources["odd"]), str(out), force=True)
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    with pytest.raises(GGMergeError, match="did you mean 'Q4_K_M'"):
        quantize("q4km", str(sources["odd"]), str(tmp_path / "y.gguf"))
    assert not (tmp_path / "y.gguf").exists()


def test_default_output_names(tmp_path):
    ft = parse_ftype("q4_k_m")
    assert quantized_path(tmp_path / "m.F16.gguf", ft) == tmp_path / "m.Q4_K_M.gguf"
    assert quantized_path(tmp_path / "ggml-model-bf16.gguf", ft) == tmp_path / "ggml-model.Q4_K_M.gguf"
    assert quantized_path(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf", ft) == \
        tmp_path / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
    (tmp_path / "out" / "ninja").mkdir(parents=True)
    assert quantized_path(tmp_path / "out" / "ninja", ft) == tmp_path / "out" / "ninja.Q4_K_M.gguf"


def test_no_input_without_a_build_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GGMergeError, match="no recipe here"):
        quantize("q4_k_m")
    (tmp_path / "ggmerge.yaml").write_text(
        "name: ninja\nmerge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n"
        "dtype: bfloat16\n")
    with pytest.raises(GGMergeError, match="has not been built yet"):
        latest_build_output("ggmerge.yaml")


@pytest.mark.slow
def test_hf_folder_input_matches_convert_then_llama_quantize(tiny_mistral, tmp_path):
    """HF folder → Q8_0 in one pass == our BF16 conversion quantized by llama.cpp."""
    from ggmerge.convert.hf_to_gguf import convert_hf

    ours = quantize("Q8_0", str(tiny_mistral), str(tmp_path / "ours.Q8_0.gguf"))
    bf16 = convert_hf(tiny_mistral, tmp_path / "model.BF16.gguf", outtype="bf16")
    ref = llama_quantize(bf16, tmp_path / "ref.Q8_0.gguf", gguf.LlamaFileType.MOSTLY_Q8_0)
    assert_same_file(ours, ref)
    toks, _ = greedy(ours, "Hello", n=4)
    assert toks == greedy(ref, "Hello", n=4)[0]


@pytest.mark.slow
def test_no_input_quantizes_the_latest_build(tiny_family, tmp_path, monkeypatch):
    from ggmerge.build import build

    recipe = tmp_path / "ggmerge.yaml"
    recipe.write_text(
        f"name: tinymerge\nmerge_method: task_arithmetic\nbase_model: {tiny_family['base']}\n"
        f"models:\n  - model: {tiny_family['ft1']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tiny_family['ft2']}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n")
    monkeypatch.chdir(tmp_path)
    built = build("ggmerge.yaml")
    assert latest_build_output("ggmerge.yaml").resolve() == Path(built).resolve()
    out = quantize("q8_0")
    assert out.resolve() == (tmp_path / "out" / "tinymerge.Q8_0.gguf").resolve()
    assert len(greedy(out, "Hello", n=3)[0]) == 3
    # a re-run with nothing changed is skipped (make-style: output newer than every input file)
    stamp = out.stat().st_mtime_ns
    assert quantize("Q8_0") == out and out.stat().st_mtime_ns == stamp
    # a rebuilt input makes the old output stale: it is quantized again

    cfg = Path(built) / "config.json"
    os.utime(cfg, ns=(stamp + 10**9, stamp + 10**9))
    assert quantize("Q8_0") == out and out.stat().st_mtime_ns > stamp
    # a file that is not ours (another type under this name) is never replaced without --force
    other = quantize("Q4_0", output=str(tmp_path / "other.gguf"))
    with pytest.raises(GGMergeError, match="already exists"):
        quantize("Q8_0", output=str(other))

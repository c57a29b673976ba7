"""``ggmerge quantize TYPE --imatrix FILE`` against the real ``llama-quantize --imatrix FILE``.

Whole files must be byte-identical (tensor bytes, the mixture's has_imatrix rules, the
``quantize.imatrix.*`` metadata) for the tiny fixture shapes (256-wide rows; 96-wide rows where
every K-quant falls back) and for the real SmolLM2-135M (576-wide rows: Q5_0/Q4_0/Q8_0/IQ4_NL
fallbacks). Two imatrix sources: files written by our writer (llama-quantize must accept them) and
files llama-imatrix computes on a real text (the Python documentation the standard library ships),
in its GGUF and legacy .dat formats (we must read both as llama-quantize does).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

pytest.importorskip("llama_cpp")
import llama_tools  # noqa: E402
from test_policy import llama_quantize, write_tiny_gguf  # noqa: E402
from test_quantize_file import ODD, STD, assert_same_file  # noqa: E402

from ggmerge.errors import GGMergeError  # noqa: E402
from ggmerge.imatrix.files import load_imatrix, write_imatrix  # noqa: E402
from ggmerge.quantize import quantize  # noqa: E402


def _tool(name: str) -> Path:
    return llama_tools.tool(name)


def run_llama_quantize(src: Path, dst: Path, ftype: str, imatrix: str | None) -> subprocess.CompletedProcess:
    args = [str(_tool("llama-quantize"))]
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    args += [str(src), str(dst), ftype, "2"]
    return subprocess.run(args, capture_output=True, text=True)


def reference(src: Path, dst: Path, ftype: str, imatrix: str | None) -> Path:
    r = run_llama_quantize(src, dst, ftype, imatrix)
    assert r.returncode == 0, r.stderr[-2000:]
    return dst


def calibration_text(path: Path, n_bytes: int = 24_000) -> Path:
    """Real English prose every Python install ships: the standard library's pydoc topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    path.write_text(text[:n_bytes], encoding="utf-8")
    return path


def synthetic_imatrix(src: Path, path: Path, seed: int = 0) -> Path:
    """An imatrix for every 2-D weight of ``src`` from our writer: skewed sums (a few hot columns),
    varied counts, one entry with a zero count (llama-quantize then uses weights of 1)."""
    rng = np.random.default_rng(seed)
    entries = {}
    for i, t in enumerate(gguf.GGUFReader(src).tensors):
        if len(t.shape) < 2 or t.name.startswith(("token_embd", "output.")) or "gate_inp" in t.name:
            continue
        n = int(t.shape[0])
        n_mat = int(t.shape[2]) if len(t.shape) == 3 else 1  # experts: one row and one count each
        sums = (rng.standard_normal((n_mat, n)) ** 2 * 40).astype(np.float32)
        sums[:, rng.integers(0, n, 3)] *= 300
        counts = rng.integers(50, 5000, n_mat)
        if i == 7 or n_mat > 1:
            counts[-1] = 0  # an expert (or matrix) that saw nothing: weights of 1
        entries[t.name] = (sums if n_mat > 1 else sums[0], counts if n_mat > 1 else int(counts[0]))
    return write_imatrix(path, entries, datasets=["synthetic.txt"], chunk_count=3, chunk_size=128)


def write_tiny_moe(path: Path, n_expert: int = 4, seed: int = 3) -> Path:
    """A tiny llama-architecture mixture of experts (Mixtral's layout: 3-D ``ffn_*_exps`` tensors)."""
    from test_policy import llama_tensors

    rng = np.random.default_rng(seed)
    n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab = 2, 256, 512, 4, 1, 320
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(2)
    w.add_file_type(1)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁t{i}" for i in range(n_vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(n_vocab)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, shape in llama_tensors(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, n_expert=n_expert):
        x = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        w.add_tensor(name, x if len(shape) == 1 or "gate_inp" in name else x.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("imq")
    out = {}
    for key, spec, seed in (("std", STD, 1), ("odd", ODD, 2)):
        src = write_tiny_gguf(d / f"{key}.F16.gguf", seed=seed, **spec)
        out[key] = (src, synthetic_imatrix(src, d / f"{key}.imatrix.gguf", seed))
    return out


#: every file type on the 256-wide shape; on the 96-wide one (where each type falls back to a 32-block
#: type, weighted too) those whose fallbacks differ
TINY_CASES = [("std", t) for t in ("Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q5_K_S", "Q4_0",
                                   "Q5_0", "Q2_K_S")] + [("odd", t) for t in ("Q4_K_M", "Q2_K", "Q5_K_S", "IQ4_XS")]


@pytest.mark.slow
@pytest.mark.parametrize("model, ftype", TINY_CASES)
def test_tiny_same_file_as_llama_quantize_imatrix(tiny, model, ftype, tmp_path):
    src, im = tiny[model]
    ref = reference(src, tmp_path / "ref.gguf", ftype, str(im))
    ours = quantize(ftype, str(src), str(tmp_path / "ours.gguf"), imatrix=str(im))
    assert_same_file(ours, ref)
    fields = gguf.GGUFReader(ours).fields
    assert fields["quantize.imatrix.file"].contents() == str(im)
    assert fields["quantize.imatrix.dataset"].contents() == "synthetic.txt"
    assert fields["quantize.imatrix.chunks_count"].contents() == 3


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_K_M", "IQ4_XS", "Q3_K_M"])
def test_experts_same_file_as_llama_quantize_imatrix(ftype, tmp_path):
    """3-D expert tensors: each expert's rows use its own imatrix row (counts divided per expert, an
    expert with no count gets weights of 1), as llama_tensor_quantize_impl does."""
    src = write_tiny_moe(tmp_path / "moe.F16.gguf")
    im = synthetic_imatrix(src, tmp_path / "moe.imatrix.gguf")
    assert load_imatrix(im).for_tensor("blk.0.ffn_down_exps.weight", 512, 4).shape == (4, 512)
    ref = reference(src, tmp_path / "ref.gguf", ftype, str(im))
    ours = quantize(ftype, str(src), str(tmp_path / "ours.gguf"), imatrix=str(im))
    assert_same_file(ours, ref)
    plain = quantize(ftype, str(src), str(tmp_path / "plain.gguf"))  # the weights did change the experts
    exps = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(plain).tensors if "_exps" in t.name}
    assert all(exps[t.name] != np.asarray(t.data).tobytes()
               for t in gguf.GGUFReader(ours).tensors if t.name in exps)


def test_q2_k_s_needs_an_imatrix(tiny, tmp_path):
    src, _ = tiny["std"]
    with pytest.raises(GGMergeError, match=r"Q2_K_S needs an importance matrix.*--imatrix"):
        quantize("Q2_K_S", str(src), str(tmp_path / "x.gguf"))
    assert not (tmp_path / "x.gguf").exists()
    r = run_llama_quantize(src, tmp_path / "ref.gguf", "Q2_K_S", None)
    assert r.returncode != 0 and "requires an imatrix" in (r.stdout + r.stderr)


def test_imatrix_for_another_model_is_refused_like_llama_quantize(tiny, tmp_path):
    """An entry whose size does not fit the tensor: llama-quantize aborts; we refuse at plan time."""
    (src, _), (_, other) = tiny["std"], tiny["odd"]
    with pytest.raises(GGMergeError, match="imatrix has 96 values.*needs 256"):
        quantize("Q4_K_M", str(src), str(tmp_path / "x.gguf"), imatrix=str(other))
    assert not (tmp_path / "x.gguf").exists()
    assert run_llama_quantize(src, tmp_path / "ref.gguf", "Q4_K_M", str(other)).returncode != 0


# --- the real SmolLM2-135M and real llama-imatrix files ------------------------------------------

def first_layers(src: Path, dst: Path, n_layer: int) -> Path:
    """``src`` cut to its first ``n_layer`` blocks (real weights, metadata copied, block_count changed):
    the real 576-wide rows at a fraction of the cost of all 30 layers."""
    from ggmerge.quantize import _copy_field

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == f"{arch}.block_count":
            w.add_uint32(key, n_layer)
        else:
            _copy_field(w, f, src)
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layer:
            continue
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The first 6 of SmolLM2-135M's 30 layers, dequantized to F16 by llama.cpp, and llama-imatrix's
    files for it (GGUF and .dat) computed on 4 chunks of 256 tokens of real text."""
    from models import smollm2_path

    d = tmp_path_factory.mktemp("smollm2im")
    cut = first_layers(smollm2_path(), d / "SmolLM2-6L.Q4_1.gguf", 6)
    f16 = llama_quantize(cut, d / "SmolLM2-6L.F16.gguf", gguf.LlamaFileType.MOSTLY_F16, nthread=2)
    text = calibration_text(d / "pydoc-topics.txt")
    files = {}
    for fmt, name in (("gguf", "imatrix.gguf"), ("dat", "imatrix.dat")):
        r = subprocess.run([str(_tool("llama-imatrix")), "-m", str(f16), "-f", str(text), "-o", str(d / name),
                            "-c", "256", "--chunks", "4", "-t", "2", "--output-format", fmt,
                            *llama_tools.EVAL_FLAGS], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        files[fmt] = d / name
    return f16, files


@pytest.mark.slow
def test_reads_llama_imatrix_files(smollm2, tmp_path):
    _, files = smollm2
    g, dat = load_imatrix(files["gguf"]), load_imatrix(files["dat"])
    assert not g.is_legacy and dat.is_legacy
    assert g.chunk_count == 4 and g.chunk_size == 256 and g.datasets[0].endswith("pydoc-topics.txt")
    assert set(g.weights) == set(dat.weights)
    assert "blk.0.attn_q.weight" in g.weights and "blk.5.ffn_down.weight" in g.weights
    assert g.weights["blk.0.ffn_down.weight"].shape == (1536,)
    for name, w in g.weights.items():  # the same means, up to the .dat format's float rounding
        np.testing.assert_allclose(dat.weights[name], w, rtol=1e-5, err_msg=name)
    # our writer, fed what llama-imatrix wrote, writes its file byte for byte
    e = {n: (x.sums, x.counts) for n, x in g.entries.items()}
    ours = write_imatrix(tmp_path / "again.gguf", e, datasets=g.datasets, chunk_count=g.chunk_count,
                         chunk_size=g.chunk_size)
    assert ours.read_bytes() == files["gguf"].read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K", "IQ4_XS"])
def test_real_smollm2_same_file_as_llama_quantize_imatrix(smollm2, ftype, tmp_path):
    """(All 30 layers gave the same result when run once by hand: 9 minutes on the loaded test machine.)"""
    f16, files = smollm2
    fmt = "dat" if ftype == "Q3_K_M" else "gguf"  # one type through the legacy format
    ref = reference(f16, tmp_path / "ref.gguf", ftype, str(files[fmt]))
    ours = quantize(ftype, str(f16), str(tmp_path / "ours.gguf"), imatrix=str(files[fmt]))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ours).tensors}
    fallback = {"Q4_K_M": "Q5_0", "Q3_K_M": "Q4_0", "Q2_K": "Q4_0", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}[ftype]
    assert types["blk.3.attn_q.weight"] == fallback  # 576 columns: the block-32 fallback, weighted too
    assert_same_file(ours, ref)
    os.unlink(ref)


def test_cli(tiny, tmp_path):
    """`ggmerge quantize TYPE INPUT --imatrix FILE`; its errors are one line with a non-zero exit."""
    import sys

    src, im = tiny["std"]
    env = dict(os.environ, GGMERGE_PROGRESS="0")
    cli = [sys.executable, "-m", "ggmerge.cli", "quantize"]
    r = subprocess.run(cli + ["iq4_xs", str(src), "-o", str(tmp_path / "a.gguf"), "--imatrix", str(im)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    lib = quantize("IQ4_XS", str(src), str(tmp_path / "b.gguf"), imatrix=str(im))
    assert (tmp_path / "a.gguf").read_bytes() == lib.read_bytes()
    for args, msg in ((["q2_k_s", str(src), "-o", str(tmp_path / "c.gguf")], "Q2_K_S needs an importance matrix"),
                      (["q4_k_m", str(src), "-o", str(tmp_path / "d.gguf"), "--imatrix", str(tmp_path / "nope")],
                       "no such imatrix file"),
                      (["q4_k_m", str(src), "-o", str(tmp_path / "e.gguf"), "--imatrix", str(src)],
                       "not an imatrix file")):
        r = subprocess.run(cli + args, capture_output=True, text=True, env=env)
        errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
        assert r.returncode != 0 and msg in r.stderr and len(errors) == 1, r.stderr
    assert not list(tmp_path.glob("[cde].gguf*"))

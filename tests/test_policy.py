"""The per-tensor type policy against llama.cpp itself.

Two references, both the real llama.cpp compiled into llama-cpp-python:

* ``llama_quant_compute_types`` (llama-ext.h, exported from libllama, C++ linkage) runs
  ``llama_tensor_get_type`` on name/shape-only tensors of a mock model — so full-size shapes
  (Mistral-7B, a 70B, Mixtral, Falcon-7B, SmolLM2) cost nothing;
* ``llama_model_quantize`` on tiny F16 GGUFs written here with gguf-py, whose output types are read
  back: the end-to-end path (tensor order, tied embeddings, 1-D tensors, file_type) on real files.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from ggmerge.convert.quants.ftypes import FILE_TYPES, parse_ftype
from ggmerge.convert.quants.policy import Hparams, allows_quantization, choose_types, llama_order
from ggmerge.errors import GGMergeError

llama_cpp = pytest.importorskip("llama_cpp")

# --------------------------------------------------------------------------------------------
# tensor lists of real model families (names as llama.cpp's converters write them)
# --------------------------------------------------------------------------------------------


def llama_tensors(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, *, tied=False, n_expert=0):
    hd = n_embd // n_head
    out = [("token_embd.weight", (n_vocab, n_embd)), ("output_norm.weight", (n_embd,))]
    if not tied:
        out.append(("output.weight", (n_vocab, n_embd)))
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (n_embd,)), (b + "ffn_norm.weight", (n_embd,)),
            (b + "attn_q.weight", (n_head * hd, n_embd)), (b + "attn_k.weight", (n_head_kv * hd, n_embd)),
            (b + "attn_v.weight", (n_head_kv * hd, n_embd)), (b + "attn_output.weight", (n_embd, n_head * hd)),
        ]
        if n_expert:
            out += [
                (b + "ffn_gate_inp.weight", (n_expert, n_embd)),
                (b + "ffn_gate_exps.weight", (n_expert, n_ff, n_embd)),
                (b + "ffn_up_exps.weight", (n_expert, n_ff, n_embd)),
                (b + "ffn_down_exps.weight", (n_expert, n_embd, n_ff)),
            ]
        else:
            out += [(b + "ffn_gate.weight", (n_ff, n_embd)), (b + "ffn_up.weight", (n_ff, n_embd)),
                    (b + "ffn_down.weight", (n_embd, n_ff))]
    return out


def falcon7b_tensors():
    n_embd, n_ff, n_layer = 4544, 18176, 32
    out = [("token_embd.weight", (65024, n_embd)), ("output_norm.weight", (n_embd,)),
           ("output_norm.bias", (n_embd,)), ("output.weight", (65024, n_embd))]
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (n_embd,)), (b + "attn_norm.bias", (n_embd,)),
                (b + "attn_qkv.weight", (4672, n_embd)), (b + "attn_output.weight", (n_embd, n_embd)),
                (b + "ffn_up.weight", (n_ff, n_embd)), (b + "ffn_down.weight", (n_embd, n_ff))]
    return out


#: name → (Hparams, tensors, n_embd, n_ff); n_embd/n_ff only feed llama.cpp's mock model
MODELS = {
    "mistral-7b": (Hparams(32, 32, 8), llama_tensors(32, 4096, 14336, 32, 8, 32000), 4096, 14336),
    "llama2-7b-no-gqa": (Hparams(32, 32, 32), llama_tensors(32, 4096, 11008, 32, 32, 32000), 4096, 11008),
    "smollm2-135m-tied": (Hparams(30, 9, 3), llama_tensors(30, 576, 1536, 9, 3, 49152, tied=True), 576, 1536),
    "llama-70b": (Hparams(80, 64, 8), llama_tensors(80, 8192, 28672, 64, 8, 32000), 8192, 28672),
    "mixtral-8x7b": (Hparams(32, 32, 8, n_expert=8),
                     llama_tensors(32, 4096, 14336, 32, 8, 32000, n_expert=8), 4096, 14336),
    "falcon-7b": (Hparams(32, 71, 1, arch="falcon"), falcon7b_tensors(), 4544, 18176),
    # rows of 96 (not a multiple of 256) and an n_ff of 80 (not even a multiple of 32): F16
    "odd-rows": (Hparams(8, 3, 1), llama_tensors(8, 96, 80, 3, 1, 300, tied=True), 96, 80),
}

# --------------------------------------------------------------------------------------------
# llama_quant_compute_types through ctypes
# --------------------------------------------------------------------------------------------

_LIB = Path(llama_cpp.__file__).parent / "lib"


class _Desc(ctypes.Structure):  # struct llama_quant_model_desc (src/llama-ext.h)
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (n, ctypes.c_uint32) for n in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert",
                                       "n_embd_head_k", "n_embd_head_v")]


class _InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _fn(lib, mangled, restype, argtypes):
    try:
        f = getattr(lib, mangled)
    except AttributeError:
        pytest.skip(f"libllama does not export {mangled}")
    f.restype, f.argtypes = restype, argtypes
    return f


def llama_compute_types(hp: Hparams, tensors, n_embd, n_ff, ftype) -> dict[str, QType | None]:
    """llama.cpp's type for every tensor (None where llama.cpp does not quantize it at all)."""
    lib = ctypes.CDLL(str(_LIB / "libllama.so"))
    ggml = ctypes.CDLL(str(_LIB / "libggml-base.so"))
    vp = ctypes.c_void_p
    model_from = _fn(lib, "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc", vp,
                     [ctypes.POINTER(_Desc)])
    qinit = _fn(lib, "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params", vp,
                [vp, ctypes.POINTER(llama_cpp.llama_model_quantize_params)])
    qfree = _fn(lib, "_Z16llama_quant_freeP19quantize_state_impl", None, [vp])
    allows = _fn(lib, "_Z38llama_quant_tensor_allows_quantizationPK19quantize_state_implPK11ggml_tensor",
                 ctypes.c_bool, [vp, vp])
    compute = _fn(lib, "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
                  None, [vp, ctypes.c_int, ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_int), ctypes.c_size_t])
    ggml.ggml_init.restype, ggml.ggml_init.argtypes = vp, [_InitParams]
    ggml.ggml_tensor_overhead.restype = ctypes.c_size_t
    ggml.ggml_new_tensor.restype = vp
    ggml.ggml_new_tensor.argtypes = [vp, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    ggml.ggml_set_name.restype, ggml.ggml_set_name.argtypes = vp, [vp, ctypes.c_char_p]
    ggml.ggml_free.argtypes = [vp]
    lib.llama_model_free.argtypes = [vp]

    hd = n_embd // hp.n_head
    desc = _Desc(hp.arch.encode(), n_embd, n_ff, hp.n_layer, hp.n_head, hp.n_head_kv, hp.n_expert, hd, hd)
    model = model_from(ctypes.byref(desc))
    params = llama_cpp.llama_model_quantize_default_params()
    qs = qinit(model, ctypes.byref(params))
    ctx = ggml.ggml_init(_InitParams(len(tensors) * ggml.ggml_tensor_overhead() + 4096, None, True))
    try:
        result: dict[str, QType | None] = {}
        quantizable = []
        for name, shape in tensors:
            ne = (ctypes.c_int64 * len(shape))(*reversed(shape))
            t = ggml.ggml_new_tensor(ctx, int(QType.F32), len(shape), ne)
            ggml.ggml_set_name(t, name.encode())
            if allows(qs, t):
                quantizable.append((name, t))
            else:
                result[name] = None
        # the order llama_model_loader gives (weight_name_comparer): by block index, then by name
        quantizable.sort(key=lambda nt: (_block(nt[0]), nt[0].encode()))
        arr = (vp * len(quantizable))(*[t for _, t in quantizable])
        out = (ctypes.c_int * len(quantizable))()
        compute(qs, int(ftype), arr, out, len(quantizable))
        result.update({name: QType(v) for (name, _), v in zip(quantizable, out)})
        return result
    finally:
        ggml.ggml_free(ctx)
        qfree(qs)
        lib.llama_model_free(model)


def _block(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


@pytest.mark.parametrize("model", list(MODELS))
def test_choices_match_llama_cpp_for_every_ftype(model):
    hp, tensors, n_embd, n_ff = MODELS[model]
    checked = 0
    for ft in FILE_TYPES.values():
        ref = llama_compute_types(hp, tensors, n_embd, n_ff, ft.ftype)
        ours = choose_types(ft, tensors, hp)
        assert set(ours) == set(ref)
        diff = {n: (ours[n].qtype.name, ref[n].name) for n in ref
                if ref[n] is not None and ours[n].qtype != ref[n]}
        assert not diff, f"{ft.name}: ours vs llama.cpp {dict(list(diff.items())[:8])}"
        for n in ref:
            assert ours[n].quantizable == (ref[n] is not None), n
            if ref[n] is None:
                assert ours[n].qtype == QType.F32  # unquantized tensors keep their stored type
            checked += 1
    assert checked == len(tensors) * len(FILE_TYPES)


def test_every_deviation_has_a_reason_and_fallbacks_are_flagged():
    hp, tensors, *_ = MODELS["smollm2-135m-tied"]
    ch = choose_types("Q4_K_M", tensors, hp)
    for name, c in ch.items():
        if c.quantizable and c.qtype != QType.Q4_K:
            assert c.reason, name
    # 576 is not a multiple of 256: every 576-wide weight falls back (Q4_K → Q5_0, Q6_K → Q8_0),
    # the tied token_embd goes to Q8_0, and ffn_down (1536 = 6 × 256 wide) keeps its K-quant
    assert ch["token_embd.weight"] == (QType.Q8_0, ch["token_embd.weight"].reason, True, True)
    assert ch["blk.5.attn_q.weight"].qtype == QType.Q5_0 and ch["blk.5.attn_q.weight"].fallback
    assert ch["blk.0.attn_v.weight"].qtype == QType.Q8_0 and "Q6_K" in ch["blk.0.attn_v.weight"].reason
    assert ch["blk.0.ffn_down.weight"].qtype == QType.Q6_K and not ch["blk.0.ffn_down.weight"].fallback
    assert ch["blk.4.ffn_down.weight"] == (QType.Q4_K, None, False, True)
    assert ch["output_norm.weight"] == (QType.F32, None, False, False)
    odd = choose_types("Q8_0", MODELS["odd-rows"][1], MODELS["odd-rows"][0])
    assert odd["blk.0.ffn_down.weight"].qtype == QType.F16 and "F16" in odd["blk.0.ffn_down.weight"].reason


def test_allows_quantization_matches_llama_cpp_on_edge_names():
    hp = Hparams(2, 4, 4)
    tensors = [("blk.0.ffn_gate_inp.weight", (8, 256)), ("blk.0.attn_norm.weight", (256,)),
               ("blk.0.attn_q.bias", (256, 256)), ("position_embd.weight", (512, 256)),
               ("blk.0.attn_rel_b.weight", (32, 256)), ("blk.0.attn_q.weight", (1, 256)),
               ("blk.0.time_mix_w1.weight", (256, 256)), ("blk.0.ssm_conv1d.weight", (256, 256)),
               ("blk.0.attn_k.weight", (256, 256)), ("blk.1.attn_v.weight", (256, 256))]
    ref = llama_compute_types(hp, tensors, 256, 512, gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for name, shape in tensors:
        assert allows_quantization(name, shape) == (ref[name] is not None), name


def test_ftype_parsing():
    assert parse_ftype("q4_k_m").name == "Q4_K_M"
    assert parse_ftype("Q4_K").name == "Q4_K_M"  # llama-quantize's alias
    assert parse_ftype("q5-k-s").name == "Q5_K_S"
    assert parse_ftype("15").name == "Q4_K_M"
    assert parse_ftype("bf16").default == QType.BF16
    with pytest.raises(GGMergeError, match="did you mean 'Q4_K_M'"):
        parse_ftype("q4_km")
    with pytest.raises(GGMergeError, match="supported"):
        parse_ftype("IQ2_XXS")


# --------------------------------------------------------------------------------------------
# llama_model_quantize on tiny real files
# --------------------------------------------------------------------------------------------

def write_tiny_gguf(path: Path, *, n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=1, n_vocab=320,
                    tied=False, dtype=QType.F16, seed=0) -> Path:
    """A small llama-architecture GGUF that llama.cpp loads and runs: random weights, F32 norms,
    and a byte-fallback SentencePiece-style vocabulary (control tokens, 256 bytes, letters)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("ggmerge-tiny")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type({QType.F16: 1, QType.BF16: 32, QType.F32: 0}[dtype])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["▁"] + ["▁" + c for c in letters] + letters
    pieces += ["▁" + a + b for a in letters for b in letters]
    tokens += pieces[: n_vocab - len(tokens)]
    assert len(tokens) == n_vocab
    types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(n_vocab - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, shape in llama_tensors(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, tied=tied):
        if len(shape) == 1:
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        x = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if dtype == QType.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif dtype == QType.BF16:
            raw = gguf.quants.quantize(x, QType.BF16)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=QType.BF16)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_quantize(src: Path, dst: Path, ftype, *, nthread: int = 1) -> Path:
    """llama.cpp's own quantizer (llama-quantize without an imatrix), requantizing allowed."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = nthread
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"
    return dst


def gguf_types(path: Path) -> list[tuple[str, QType]]:
    r = gguf.GGUFReader(path)
    return [(t.name, t.tensor_type) for t in r.tensors]


TINY = {
    # 12 layers exercise every layer rule; GQA 4; separate output.weight
    "gqa4-untied": dict(n_layer=12, n_embd=256, n_ff=512, n_head=4, n_head_kv=1),
    # 96-wide rows (fall back from every K-quant), n_ff 80 (F16), tied embeddings, GQA 3
    "odd-tied": dict(n_layer=8, n_embd=96, n_ff=80, n_head=3, n_head_kv=1, tied=True),
}


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    return {k: write_tiny_gguf(d / f"{k}.F16.gguf", **v) for k, v in TINY.items()}


@pytest.mark.parametrize("model", list(TINY))
def test_llama_model_quantize_types_and_order(model, tiny_ggufs, tmp_path):
    src = tiny_ggufs[model]
    spec = TINY[model]
    hp = Hparams(spec["n_layer"], spec["n_head"], spec["n_head_kv"])
    stored = gguf_types(src)
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in gguf.GGUFReader(src).tensors}
    for ft in FILE_TYPES.values():
        if ft.name == "Q2_K_S":  # needs an imatrix: tests/test_imatrix_quantize.py
            continue
        got = gguf_types(llama_quantize(src, tmp_path / f"{ft.name}.gguf", ft.ftype))
        ours = choose_types(ft, [(n, shapes[n], t) for n, t in stored], hp)
        assert [n for n, _ in got] == list(ours) == llama_order(shapes), ft.name
        diff = {n: (ours[n].qtype.name, t.name) for n, t in got if ours[n].qtype != t}
        assert not diff, f"{ft.name}: ours vs llama.cpp {diff}"
        r = gguf.GGUFReader(tmp_path / f"{ft.name}.gguf")
        assert r.fields["general.file_type"].contents() == int(ft.ftype)
        (tmp_path / f"{ft.name}.gguf").unlink()

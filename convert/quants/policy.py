"""Which tensor type each tensor gets in a llama.cpp file type: the policy, separate from codecs.

Mirrors src/llama-quant.cpp of the vendored llama.cpp (llama-cpp-python 0.3.36):

* ``tensor_allows_quantization`` — only ≥2-D tensors whose name ends in ``weight`` and is not a
  norm (or one of a few small special tables) are quantized; the rest keep their stored type;
* ``llama_tensor_get_type_impl`` — the per-category rules of each mixture (output / tied
  token_embd → Q6_K, attn_v and ffn_down "use_more_bits" layers, attn_output, the GQA and expert
  conditions), walked in llama.cpp's tensor order with its ``i_attention_wv`` / ``i_ffn_down``
  counters;
* ``tensor_type_fallback`` — a row length that is not a multiple of the chosen type's block
  (e.g. SmolLM2's 576 for the 256-wide K-quants) demotes to a 32-block type, or to F16.

With an importance matrix (``has_imatrix``, llama.cpp's ``qs.has_imatrix``) three rules change:
IQ4_NL/IQ4_XS keep the first eighth of ffn_down at their type (without one: Q5_K), and Q4_0/Q5_0
give it Q4_1/Q5_1. :func:`requires_imatrix` mirrors ``tensor_requires_imatrix``: of the file types
in :mod:`.ftypes` only Q2_K_S needs one. For those file types every type the rules can produce
(Q2_K…Q6_K, Q4_0…Q5_1, Q8_0, IQ4_NL, IQ4_XS, F16) is one we encode. Every deviation from the file type's default type carries a reason, and
fallbacks are flagged so callers can warn about each of them.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Sequence

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from ggmerge.arch import QuantHparams as Hparams  # the facts the rules read live with the families
from ggmerge.errors import GGMergeError

from .ftypes import FileType, parse_ftype


class Choice(NamedTuple):
    qtype: QType
    #: why this tensor does not get the file type's default type (None: it does)
    reason: str | None = None
    #: True when the row length forced a different type (llama.cpp prints a warning for these)
    fallback: bool = False
    #: False for tensors llama.cpp never quantizes (1-D, norms, …): they keep their stored type
    quantizable: bool = True


# --- which tensors are quantized at all (tensor_allows_quantization) -----------------------------

#: substrings that exclude a weight from quantization: small or sensitive tables of other
#: architectures (MoE routers, RWKV time-mix, Mamba conv, T5 relative bias, vision/audio parts)
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
    *(f"time_mix_{k}.weight" for k in (
        "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
        "decay_w1", "decay_w2", "lerp_fused")),
)
_NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing size-1 dimensions (in ggml order) do not count, minimum 1."""
    ne = list(reversed(shape))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_EXACT:
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


# --- categories (tensor_get_category) ------------------------------------------------------------

def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for cat, sub in (
        ("attn_qkv", "attn_qkv.weight"), ("attn_kv_b", "attn_kv_b.weight"),
        ("attn_v", "attn_v.weight"), ("attn_k", "attn_k.weight"), ("attn_q", "attn_q.weight"),
        ("attn_output", "attn_output.weight"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if sub in name:
            return cat
    return "other"


#: categories llama.cpp treats like attn_v (category_is_attn_v)
_ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")

_LAYER_RX = re.compile(r"blk\.\s*([+-]?\d+)")


def layer_of(name: str) -> int:
    """sscanf(name, "blk.%d.") — -1 for tensors outside a block."""
    m = _LAYER_RX.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names: Iterable[str]) -> list[str]:
    """llama_model_loader's weight order (weight_name_comparer): by block, then by name.

    The layer counters below advance in this order, and llama-quantize writes tensors in it.
    """
    return sorted(names, key=lambda n: (layer_of(n), n.encode()))


def block_size(qtype: QType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The first and last eighth of the layers, and every third layer between them."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# --- the rules (llama_tensor_get_type_impl), non-imatrix paths of our file types -----------------

class _Counters:
    def __init__(self, n_attention_wv: int, n_layer: int) -> None:
        self.n_attention_wv = n_attention_wv
        self.n_ffn_down = n_layer
        self.i_attention_wv = 0
        self.i_ffn_down = 0


def _rule(name: str, cat: str, ncols: int, ft: FileType, hp: Hparams, c: _Counters,
          tied: bool, has_imatrix: bool = False) -> tuple[QType, str | None, bool]:
    """(type, reason, is_fallback) for one quantizable tensor, before the block-size fallback."""
    f = ft.name
    t = ft.default
    falcon = hp.arch == "falcon"

    if cat == "output" or (tied and cat == "token_embd"):
        what = "the output projection" if cat == "output" else "the embedding, tied to the output,"
        if falcon or ncols % block_size(t) != 0:
            return QType.Q8_0, (f"{ncols} columns are not a multiple of {t.name}'s block "
                            f"{block_size(t)}: llama.cpp stores {what} as Q8_0"), not falcon
        if t != QType.Q8_0:
            return QType.Q6_K, f"llama.cpp stores {what} as Q6_K", False
        return t, None, False

    if cat == "token_embd":
        return t, None, False

    if cat in _ATTN_V_LIKE:
        # attn_qkv is caught here too, so llama.cpp's separate attn_qkv branch never runs
        i, n = c.i_attention_wv, c.n_attention_wv
        why = None
        if f == "Q2_K":
            t = QType.Q4_K if hp.n_gqa >= 4 else QType.Q3_K
            why = f"{cat} in Q2_K: {t.name} (GQA factor {hp.n_gqa} {'≥' if hp.n_gqa >= 4 else '<'} 4)"
        elif f == "Q2_K_S" and hp.n_gqa >= 4:
            t, why = QType.Q4_K, f"{cat} in Q2_K_S: Q4_K (GQA factor {hp.n_gqa} ≥ 4)"
        elif f == "Q3_K_M":
            t = QType.Q5_K if i < 2 else QType.Q4_K
            why = f"{cat} #{i} in Q3_K_M: {t.name} (first two get Q5_K)"
        elif f == "Q3_K_L":
            t, why = QType.Q5_K, f"{cat} in Q3_K_L: Q5_K"
        elif f in ("IQ4_NL", "IQ4_XS") and hp.n_gqa >= 4:
            t, why = QType.Q5_K, f"{cat} in {f}: Q5_K (GQA factor {hp.n_gqa} ≥ 4)"
        elif f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            t, why = QType.Q6_K, f"{cat} #{i} of {n} is a 'more bits' layer in {f}: Q6_K"
        elif f == "Q4_K_S" and i < 4:
            t, why = QType.Q5_K, f"{cat} #{i} in Q4_K_S: Q5_K (first four)"
        if hp.is_70b and t in (QType.Q3_K, QType.Q4_K):
            t, why = QType.Q5_K, f"{cat} in a 70B GQA model: Q5_K"
        if hp.n_expert == 8:
            t, why = QType.Q8_0, f"{cat} in an 8-expert model: Q8_0"
        c.i_attention_wv += 1
        return t, why, False

    if cat == "attn_k":
        if hp.n_expert == 8:
            return QType.Q8_0, "attn_k in an 8-expert model: Q8_0", False
        return t, None, False

    if cat == "ffn_down":
        i, n = c.i_ffn_down, c.n_ffn_down
        if hp.n_expert > 1:
            # expert tensors are not in layer order in every file: llama.cpp reads the block index
            i = layer_of(name)
            if not 0 <= i < n:
                raise GGMergeError(f"layer {i} outside [0, {n})", tensor=name)
        c.i_ffn_down += 1
        why = None
        if f == "Q2_K":
            t, why = QType.Q3_K, "ffn_down in Q2_K: Q3_K"
        elif f == "Q2_K_S":
            if i < n // 8:
                t, why = QType.Q4_K, f"ffn_down of layer {i} (first eighth) in Q2_K_S: Q4_K"
        elif f == "Q3_K_M":
            if i < n // 16:
                t, why = QType.Q5_K, f"ffn_down of layer {i} (first sixteenth) in Q3_K_M: Q5_K"
            elif not falcon or use_more_bits(i, n):
                t, why = QType.Q4_K, f"ffn_down of layer {i} in Q3_K_M: Q4_K"
        elif f == "Q3_K_L":
            t = QType.Q4_K if falcon else QType.Q5_K
            why = f"ffn_down in Q3_K_L: {t.name}"
        elif f == "Q4_K_M":
            if falcon:
                t = QType.Q6_K if i < n // 16 else QType.Q5_K if use_more_bits(i, n) else QType.Q4_K
                why = f"ffn_down of layer {i} in Q4_K_M (falcon): {t.name}" if t != ft.default else None
            elif use_more_bits(i, n):
                t, why = QType.Q6_K, f"ffn_down of layer {i} of {n} is a 'more bits' layer in Q4_K_M: Q6_K"
        elif i < n // 8 and f in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
            t, why = QType.Q5_K, f"ffn_down of layer {i} (first eighth) in {f} without an imatrix: Q5_K"
        elif f == "Q5_K_M" and use_more_bits(i, n):
            t, why = QType.Q6_K, f"ffn_down of layer {i} of {n} is a 'more bits' layer in Q5_K_M: Q6_K"
        elif f == "Q4_K_S" and not falcon and i < n // 8:
            t, why = QType.Q5_K, f"ffn_down of layer {i} (first eighth) in Q4_K_S: Q5_K"
        elif f in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
            t = QType.Q4_1 if f == "Q4_0" else QType.Q5_1
            why = f"ffn_down of layer {i} (first eighth) in {f} with an imatrix: {t.name}"
        return t, why, False

    if cat == "attn_output":
        if not falcon:
            if hp.n_expert == 8:
                if f in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS"):
                    return QType.Q5_K, f"attn_output in an 8-expert model ({f}): Q5_K", False
            elif f in ("Q2_K", "Q3_K_M", "Q3_K_L"):
                t = {"Q2_K": QType.Q3_K, "Q3_K_M": QType.Q4_K, "Q3_K_L": QType.Q5_K}[f]
                return t, f"attn_output in {f}: {t.name}", False
        elif f == "Q3_K_L":
            return QType.Q4_K, "attn_output in Q3_K_L (falcon): Q4_K", False
    return t, None, False


#: tensor_type_fallback: the 32-block type each 256-block type falls back to
_FALLBACK = {QType.Q2_K: QType.Q4_0, QType.Q3_K: QType.Q4_0, QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0,
             QType.IQ4_XS: QType.IQ4_NL}


def _fallback(ncols: int, t: QType) -> tuple[QType, str | None]:
    qk = block_size(t)
    if ncols % qk == 0:
        return t, None
    out = _FALLBACK.get(t)
    if out is None:
        if qk > 32:
            raise GGMergeError(f"no fallback type is defined for {t.name}")
        out = t
    why = f"{ncols} columns are not a multiple of {t.name}'s block {qk}"
    if ncols % block_size(out) != 0:
        # llama.cpp gives up on quantizing such an unusual shape and stores F16
        return QType.F16, why + " (nor of 32): F16"
    return out, why + f": falls back to {out.name}"


def requires_imatrix(name: str, qtype: QType, ft: FileType) -> bool:
    """tensor_requires_imatrix: a Q2_K tensor of a Q2_K_S file (embedding and output excepted; the
    IQ1/IQ2/IQ3_XXS types that also need one are not among ours)."""
    if category(name) in ("token_embd", "output"):
        return False
    return qtype == QType.Q2_K and ft.name == "Q2_K_S"


def check_imatrix_given(ftype: FileType | str, choices: dict[str, Choice], has_imatrix: bool) -> None:
    """The error llama-quantize raises ("this quantization requires an imatrix!"), at plan time."""
    ft = parse_ftype(ftype) if isinstance(ftype, str) else ftype
    if has_imatrix:
        return
    for name, ch in choices.items():
        if ch.quantizable and requires_imatrix(name, ch.qtype, ft):
            raise GGMergeError(f"{ft.name} needs an importance matrix ({name} would be {ch.qtype.name}): pass "
                               "--imatrix FILE (from `ggmerge imatrix` or llama-imatrix)", key="type")


def choose_types(
    ftype: FileType | str,
    tensors: Iterable[tuple],
    hparams: Hparams,
    *,
    has_imatrix: bool = False,
) -> dict[str, Choice]:
    """The type of every tensor in a file of type ``ftype``, as llama-quantize would choose it
    (``has_imatrix``: with ``--imatrix``, which changes a few rules).

    ``tensors`` holds ``(name, shape)`` or ``(name, shape, stored_type)`` with GGUF names and
    numpy-order shapes (rows, cols). Tensors that are never quantized keep ``stored_type``
    (F32 if not given: what the converter stores 1-D tensors as). The result is in llama.cpp's
    tensor order (:func:`llama_order`), which the layer counters depend on.
    """
    ft = parse_ftype(ftype) if isinstance(ftype, str) else ftype
    info = {}
    for t in tensors:
        name, shape = t[0], tuple(int(s) for s in t[1])
        stored = QType(t[2]) if len(t) > 2 and t[2] is not None else QType.F32
        info[name] = (shape, stored)
    order = llama_order(info)
    cats = {n: category(n) for n in order}
    counters = _Counters(sum(cats[n] in _ATTN_V_LIKE for n in order), hparams.n_layer)
    tied = "output.weight" not in cats

    out: dict[str, Choice] = {}
    for name in order:
        shape, stored = info[name]
        if not allows_quantization(name, shape):
            out[name] = Choice(stored, None, False, False)
            continue
        if not ft.quantized:
            # F32/F16/BF16 files: every quantizable weight simply takes the default type
            out[name] = Choice(ft.default)
            continue
        ncols = shape[-1]
        t, why, fell = _rule(name, cats[name], ncols, ft, hparams, counters, tied, has_imatrix)
        t2, fwhy = _fallback(ncols, t)
        if fwhy is not None:
            why, fell, t = (f"{why}; then {fwhy}" if why else fwhy), True, t2
        out[name] = Choice(t, why if t != ft.default or fell else None, fell)
    return out

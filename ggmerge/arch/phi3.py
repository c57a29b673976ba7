"""Phi-3 / Phi-3.5 (GGUF ``phi3``): ``Phi3ForCausalLM``.

What differs from the llama-like layout of :mod:`.base` (llama.cpp's convert_hf_to_gguf.py
``Phi3MiniModel`` in conversion/phi.py; src/models/phi3.cpp; transformers' modeling_phi3):

* fused projections, kept fused in GGUF: ``self_attn.qkv_proj`` (Q, K, V rows stacked) →
  ``attn_qkv`` and ``mlp.gate_up_proj`` (gate rows, then up rows) → ``ffn_up`` with 2 × n_ff rows
  (llama.cpp splits them in its graph). mergekit merges them as whole tensors too (its phi3.json), so
  merge methods, slices and filters see one tensor each;
* no Q/K permutation (NeoX RoPE, HF's layout); partial rotary (``partial_rotary_factor``) is
  ``rope.dimension_count`` = int(factor × hidden) / heads;
* ``rope.scaling.original_context_length`` always, and for LongRoPE ("su"/"longrope") models two
  derived tensors ``rope_factors_long`` / ``rope_factors_short`` (per rotary frequency) and
  ``rope.scaling.attn_factor`` = sqrt(1 + ln(scale) / ln(original context)) — transformers' default
  attention factor; llama.cpp picks long or short by the context size it runs with (transformers by
  the sequence length), so they agree whenever both stay on one side of the original context;
* ``attention.sliding_window`` (0 when the config has none); llama.cpp reads it but runs Phi-3 with
  full attention ("Phi SWA is currently disabled"), so outputs differ beyond the window — warned.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import GGMergeError
from .base import LLAMA_GLOBAL, Family, Hparams, f32

log = logging.getLogger(__name__)

_PHI3_LAYER = {
    "input_layernorm.weight": ("attn_norm.weight", lambda hp: (hp.n_embd,)),
    "self_attn.qkv_proj.weight": ("attn_qkv.weight",
                                  lambda hp: ((hp.n_head + 2 * hp.n_head_kv) * hp.head_dim, hp.n_embd)),
    "self_attn.o_proj.weight": ("attn_output.weight", lambda hp: (hp.n_embd, hp.n_head * hp.head_dim)),
    "post_attention_layernorm.weight": ("ffn_norm.weight", lambda hp: (hp.n_embd,)),
    "mlp.gate_up_proj.weight": ("ffn_up.weight", lambda hp: (2 * hp.n_ff, hp.n_embd)),
    "mlp.down_proj.weight": ("ffn_down.weight", lambda hp: (hp.n_embd, hp.n_ff)),
}

#: the derived LongRoPE tensors (GGUF only; HF keeps the lists in config.json)
ROPE_LONG, ROPE_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
_LONGROPE = (ROPE_LONG, ROPE_SHORT)


class Phi3(Family):
    gguf_arch = "phi3"
    title = "Phi-3"
    hf_architectures = ("Phi3ForCausalLM",)
    model_types = {"phi3": "Phi3ForCausalLM"}
    global_tensors = LLAMA_GLOBAL
    layer_tensors = _PHI3_LAYER
    rope_types = ("default", "longrope", "su")
    refused_config = {
        "attention_bias": "bias tensors are not supported for phi3",
        "mlp_bias": "bias tensors are not supported for phi3",
    }

    # -- config → hparams -------------------------------------------------------------------------
    def read_extra(self, config: dict, hp: Hparams, path) -> None:
        x = hp.extra
        rope = hp.rope
        orig = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        if orig is None:
            raise GGMergeError("missing from config.json (Phi-3 needs it)", path=path,
                               key="original_max_position_embeddings")
        x["orig_ctx"] = int(orig)
        prf = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        x["partial_rotary_factor"] = float(prf)
        x["rope_dim"] = int(float(prf) * hp.n_embd) // hp.n_head
        sw = config.get("sliding_window")
        x["sliding_window"] = None if sw is None else int(sw)
        if sw and int(sw) < hp.n_ctx:
            log.warning("%s: sliding_window=%s is written, but llama.cpp runs phi3 with full attention; "
                        "outputs differ only beyond %s tokens", path or "config", sw, sw)
        if str(rope["rope_type"]).lower() in ("longrope", "su"):
            long_f, short_f = rope.get("long_factor"), rope.get("short_factor")
            if not long_f or not short_f or len(long_f) != len(short_f) or len(long_f) * 2 != x["rope_dim"]:
                raise GGMergeError(f"LongRoPE needs long_factor and short_factor of {x['rope_dim'] // 2} "
                                   "values each", path=path, key="rope_scaling")

    def attn_factor(self, hp: Hparams) -> float:
        """LongRoPE's attention factor (transformers' ``_compute_longrope_parameters`` default, the
        converter's ``Phi3MiniModel.generate_extra_tensors``)."""
        if hp.rope.get("attention_factor") is not None:
            return float(hp.rope["attention_factor"])
        scale = hp.n_ctx / hp.extra["orig_ctx"]
        return math.sqrt(1 + math.log(scale) / math.log(hp.extra["orig_ctx"])) if scale > 1.0 else 1.0

    def is_longrope(self, hp: Hparams) -> bool:
        return str(hp.rope["rope_type"]).lower() in ("longrope", "su")

    def extra_tensors(self, hp: Hparams):
        if not self.is_longrope(hp):
            return []
        n = hp.extra["rope_dim"] // 2
        return [(ROPE_LONG, (n,), lambda: np.asarray(hp.rope["long_factor"], dtype=np.float32)),
                (ROPE_SHORT, (n,), lambda: np.asarray(hp.rope["short_factor"], dtype=np.float32))]

    def sort_key(self, gguf_name: str):
        if gguf_name in _LONGROPE:
            return (-1, 0, 0, gguf_name)
        return super().sort_key(gguf_name)

    # -- hparams → KVs ------------------------------------------------------------------------------
    def write_kvs(self, w, hp: Hparams, *, name: str | None, file_type) -> None:
        """The KVs ``Phi3MiniModel.set_gguf_parameters`` writes (it does not call the base class)."""
        import gguf

        x = hp.extra
        w.add_type(gguf.GGUFType.MODEL)
        if name:
            w.add_name(name)
        w.add_context_length(hp.n_ctx)
        w.add_rope_scaling_orig_ctx_len(x["orig_ctx"])
        w.add_embedding_length(hp.n_embd)
        w.add_feed_forward_length(hp.n_ff)
        w.add_block_count(hp.n_layer)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_rope_dimension_count(x["rope_dim"])
        w.add_rope_freq_base(float(hp.rope["rope_theta"]))
        w.add_file_type(int(file_type))
        # the converter writes 0 for "no window" (its way of telling Phi-4 apart)
        w.add_sliding_window(x["sliding_window"] or 0)
        if self.is_longrope(hp):
            w.add_rope_scaling_attn_factors(self.attn_factor(hp))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # -- GGUF → hparams → config --------------------------------------------------------------------
    def read_extra_gguf(self, reader, get, hp: Hparams, path) -> None:
        a = self.gguf_arch
        x = hp.extra
        x["orig_ctx"] = int(get(f"{a}.rope.scaling.original_context_length", hp.n_ctx))
        x["rope_dim"] = int(get(f"{a}.rope.dimension_count", hp.head_dim))
        x["partial_rotary_factor"] = x["rope_dim"] * hp.n_head / hp.n_embd
        sw = get(f"{a}.attention.sliding_window")
        x["sliding_window"] = int(sw) if sw else None
        # head_dim: phi3 GGUFs carry no key_length; the base class fell back to rope dims
        hp.head_dim = hp.n_embd // hp.n_head
        factors = {t.name: t for t in reader.tensors if t.name in _LONGROPE}
        if factors:
            if set(factors) != set(_LONGROPE):
                raise GGMergeError("LongRoPE needs both rope_factors_long and rope_factors_short", path=path,
                                   tensor=next(iter(factors)))
            rope = {"rope_type": "longrope", "rope_theta": hp.rope["rope_theta"],
                    "long_factor": [f32(v) for v in np.asarray(factors[ROPE_LONG].data, dtype=np.float32)],
                    "short_factor": [f32(v) for v in np.asarray(factors[ROPE_SHORT].data, dtype=np.float32)],
                    "original_max_position_embeddings": x["orig_ctx"]}
            attn = get(f"{a}.rope.scaling.attn_factor")
            hp.rope = rope
            if attn is not None:
                default = self.attn_factor(hp)
                if abs(float(attn) - default) > 1e-6 * default:
                    rope["attention_factor"] = f32(attn)

    def config_extra(self, cfg: dict, hp: Hparams) -> None:
        x = hp.extra
        cfg["original_max_position_embeddings"] = x["orig_ctx"]
        cfg["sliding_window"] = x.get("sliding_window")
        cfg["attention_bias"] = False
        if x.get("partial_rotary_factor", 1.0) != 1.0:
            cfg["partial_rotary_factor"] = x["partial_rotary_factor"]
        if self.is_longrope(hp):
            cfg["rope_scaling"] = {k: v for k, v in hp.rope.items() if k != "rope_theta"}
            cfg["rope_scaling"]["type"] = "longrope"


PHI3 = Phi3()

"""Qwen2 / Qwen2.5 (GGUF ``qwen2``) and Qwen3 (GGUF ``qwen3``).

The llama-like layout of :mod:`.base` with these differences (convert_hf_to_gguf.py's ``Qwen2Model``
and ``Qwen3Model``; src/models/qwen2.cpp, qwen3.cpp in llama.cpp):

* no Q/K permutation: llama.cpp runs both with NeoX-style RoPE (``LLAMA_ROPE_TYPE_NEOX``), which is
  HF's rotate-half layout, so the converter stores Q and K as HF does;
* Qwen2 has biases on Q, K and V (``attn_q.bias`` …; always present in HF's Qwen2Attention);
  Qwen3 has none unless ``attention_bias`` is set, and instead RMS-normalises each head of Q and K
  (``q_norm``/``k_norm``, one weight of ``head_dim``: ``attn_q_norm``/``attn_k_norm``);
* the small models tie ``lm_head`` to the embedding (no ``output.weight``; llama.cpp duplicates
  ``token_embd``); sliding-window attention is off unless ``use_sliding_window`` (llama.cpp's qwen2
  has none).
"""
from __future__ import annotations

import logging

from .base import LLAMA_LAYER, Family, Hparams

log = logging.getLogger(__name__)

_QKV_BIAS = {
    "self_attn.q_proj.bias": ("attn_q.bias", lambda hp: (hp.n_head * hp.head_dim,)),
    "self_attn.k_proj.bias": ("attn_k.bias", lambda hp: (hp.n_head_kv * hp.head_dim,)),
    "self_attn.v_proj.bias": ("attn_v.bias", lambda hp: (hp.n_head_kv * hp.head_dim,)),
}
_QK_NORM = {
    "self_attn.q_norm.weight": ("attn_q_norm.weight", lambda hp: (hp.head_dim,)),
    "self_attn.k_norm.weight": ("attn_k_norm.weight", lambda hp: (hp.head_dim,)),
}


def _after(table: dict, anchor: str, extra: dict) -> dict:
    """``table`` with ``extra`` inserted after ``anchor`` (keeps our GGUF's per-block tensor order
    readable: biases and norms beside their projection)."""
    out = {}
    for k, v in table.items():
        out[k] = v
        if k == anchor:
            out.update(extra)
    return out


class _Qwen(Family):
    def check_sliding_window(self, config: dict, n_ctx: int, path) -> None:
        # Qwen configs carry sliding_window but switch it on only with use_sliding_window (default off)
        sw = config.get("sliding_window")
        if config.get("use_sliding_window", False) and sw and int(sw) < n_ctx:
            log.warning("%s: use_sliding_window with sliding_window=%s is not implemented by llama.cpp's "
                        "%s (full attention); outputs differ only beyond %s tokens", path or "config", sw,
                        self.gguf_arch, sw)

    def config_extra(self, cfg: dict, hp: Hparams) -> None:
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None


class Qwen2(_Qwen):
    gguf_arch = "qwen2"
    title = "Qwen2 / Qwen2.5"
    hf_architectures = ("Qwen2ForCausalLM",)
    model_types = {"qwen2": "Qwen2ForCausalLM"}
    layer_tensors = _after(LLAMA_LAYER, "self_attn.v_proj.weight", _QKV_BIAS)
    refused_config = {"mlp_bias": "MLP bias tensors are not supported for qwen2"}


class Qwen3(_Qwen):
    gguf_arch = "qwen3"
    title = "Qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    model_types = {"qwen3": "Qwen3ForCausalLM"}
    layer_tensors = _after(LLAMA_LAYER, "self_attn.k_proj.weight", _QK_NORM)
    #: q/k/v biases when ``attention_bias`` is set (llama.cpp loads them if present)
    optional_layer_tensors = _QKV_BIAS
    refused_config = {"mlp_bias": "MLP bias tensors are not supported for qwen3"}

    def read_extra(self, config: dict, hp: Hparams, path) -> None:
        hp.extra["attention_bias"] = bool(config.get("attention_bias", False))

    def read_extra_gguf(self, reader, get, hp: Hparams, path) -> None:
        hp.extra["attention_bias"] = any(t.name.endswith("attn_q.bias") for t in reader.tensors)

    def config_extra(self, cfg: dict, hp: Hparams) -> None:
        super().config_extra(cfg, hp)
        cfg["attention_bias"] = bool(hp.extra.get("attention_bias", False))


QWEN2 = Qwen2()
QWEN3 = Qwen3()

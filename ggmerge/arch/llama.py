"""Llama / Mistral family: HF ↔ GGUF tensor names and the Q/K RoPE permutation.

HF checkpoints store Q and K with the rotary halves de-interleaved ("rotate_half" layout); llama.cpp's
``llama`` architecture expects the original interleaved layout. ``convert_hf_to_gguf.py``'s
``LlamaModel.permute`` reshapes (n_head, 2, head_dim/2, in) → swap axes 1,2; we do the same and its
inverse when reading a GGUF back.
"""
from __future__ import annotations

import re

import torch

GGUF_ARCH = "llama"

#: (HF regex with {i} for the block index, GGUF name)
_TABLE = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
]

#: HF tensors that are rotary-permuted in GGUF, with the config key giving their head count
PERMUTED = {
    "self_attn.q_proj.weight": "num_attention_heads",
    "self_attn.k_proj.weight": "num_key_value_heads",
}

#: HF names of tensors that are indexed by token id (rows remapped by a union tokenizer)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")

#: tensors that are never layer-specific (mergekit gives them layer-less parameters)
EMBED_OR_HEAD = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")

#: tensors that are safe to ignore when present in a checkpoint
IGNORED = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


_HF2GGUF = [(_compile(h), g) for h, g in _TABLE]
_GGUF2HF = [(_compile(g), h) for h, g in _TABLE]


def hf_to_gguf(name: str) -> str | None:
    for rx, out in _HF2GGUF:
        m = rx.match(name)
        if m:
            return out.format(i=m.group(1)) if m.groups() else out
    return None


def gguf_to_hf(name: str) -> str | None:
    for rx, out in _GGUF2HF:
        m = rx.match(name)
        if m:
            return out.format(i=m.group(1)) if m.groups() else out
    return None


def layer_index(hf_name: str) -> int | None:
    m = re.match(r"^model\.layers\.(\d+)\.", hf_name)
    return int(m.group(1)) if m else None


def heads_for_permute(hf_name: str, config: dict) -> int | None:
    """Head count to (un)permute ``hf_name`` with, or None if it is not permuted."""
    for suffix, key in PERMUTED.items():
        if hf_name.endswith(suffix):
            n = config.get(key)
            if n is None and key == "num_key_value_heads":
                n = config["num_attention_heads"]
            return int(n)
    return None


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF (rotate-half) layout → GGUF (interleaved) layout, rows of ``w``."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
        .contiguous()
    )


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF (interleaved) layout → HF (rotate-half) layout; the inverse of :func:`permute`."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
        .contiguous()
    )

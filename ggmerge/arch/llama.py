"""Llama / Mistral family (GGUF ``llama``): Llama 1–3.x, Mistral-7B, Mistral-Nemo, Mistral-Small, SmolLM.

The llama-like layout of :mod:`.base` as it is, plus one thing of its own: HF checkpoints store Q and
K with the rotary halves de-interleaved ("rotate_half" layout) while llama.cpp's ``llama``
architecture expects the original interleaved layout (``LLAMA_ROPE_TYPE_NORM``), so Q and K are
re-interleaved on the way to GGUF (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``, with the KV
head count for K) and back on the way out. Explicit ``head_dim`` (Mistral-Nemo/Small) and llama3 RoPE
scaling (a derived ``rope_freqs.weight``) are handled by the shared code.
"""
from __future__ import annotations

from .base import Family, Hparams, permute, unpermute  # noqa: F401  (permute/unpermute: public here)


class Llama(Family):
    gguf_arch = "llama"
    title = "Llama / Mistral"
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    model_types = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
    permuted = {
        "self_attn.q_proj.weight": "num_attention_heads",
        "self_attn.k_proj.weight": "num_key_value_heads",
    }
    refused_config = {
        "attention_bias": "bias tensors are not supported for the llama architecture",
        "mlp_bias": "bias tensors are not supported for the llama architecture",
    }

    def config_extra(self, cfg: dict, hp: Hparams) -> None:
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
        if hp.hf_architecture == "MistralForCausalLM":
            cfg["sliding_window"] = None


FAMILY = Llama()

# module-level names for callers that know they deal with llama
GGUF_ARCH = FAMILY.gguf_arch
PERMUTED = FAMILY.permuted
VOCAB_TENSORS = FAMILY.vocab_tensors
IGNORED = FAMILY.ignored
hf_to_gguf = FAMILY.hf_to_gguf
gguf_to_hf = FAMILY.gguf_to_hf
heads_for_permute = FAMILY.heads_for_permute

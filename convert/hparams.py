"""HF ``config.json`` ↔ GGUF hyper-parameter KVs for the ``llama`` architecture (Llama, Mistral).

One dataclass, :class:`LlamaHparams`, is the meeting point: built from an HF config (validated:
unsupported architectures and features are refused here, at plan time) or from a GGUF's metadata,
and written out as GGUF KVs or as an HF config dict.

The keys written are the ones llama.cpp's loader reads for ``llama`` (``llama_model_loader`` in
src/llama-model.cpp and src/models/llama.cpp): context/embedding/feed-forward length, block count,
head counts (incl. KV heads), key/value length, RoPE dimension count, freq base and scaling, RMS
epsilon, vocab size, plus general.* (name, type, file type, quantization version). Which HF config
keys feed them mirrors ``TextModel.set_gguf_parameters`` / ``LlamaModel.set_gguf_parameters`` in
llama.cpp's convert_hf_to_gguf.py, including both RoPE spellings (transformers 4's ``rope_theta`` +
``rope_scaling``, transformers 5's ``rope_parameters``).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import gguf
import numpy as np

from ggmerge.errors import GGMergeError, did_you_mean

log = logging.getLogger(__name__)

ARCH = "llama"
#: HF ``architectures`` entries written as GGUF ``llama``
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
#: our GGUF KV holding HF RoPE parameters llama.cpp has no KVs for (llama3: it gets rope_freqs
#: instead); llama.cpp ignores unknown keys, and GGUF → HF reads it back
HF_ROPE_KEY = "ggmerge.hf_rope_parameters"


def _first(config: dict, keys: tuple[str, ...], default=None):
    """The first of ``keys`` present in ``config`` (HF configs spell the same thing many ways)."""
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


def _f32(x) -> float:
    """A float32 KV as the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def rope_parameters(config: dict) -> dict:
    """The RoPE settings of an HF config in one dict: rope_theta, rope_type, factor, …

    transformers ≥ 5 writes ``rope_parameters``; older configs use ``rope_theta`` and ``rope_scaling``
    (with ``type`` or ``rope_type``). Later spellings win, as in TextModel.__init__.
    """
    params: dict = {}
    params.update(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.pop("type", None)
    if "rope_theta" not in params:
        params["rope_theta"] = float(config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def llama3_rope_factors(params: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors for llama3 RoPE scaling (llama.cpp's ``rope_freqs.weight``).

    The same smooth ramp as transformers' ``_compute_llama3_parameters`` and the converter's
    ``LlamaModel.generate_extra_tensors``: wavelengths shorter than ``orig/high_freq_factor`` are kept,
    longer than ``orig/low_freq_factor`` divided by ``factor``, interpolated in between.
    """
    base = float(params.get("rope_theta", 10000.0))
    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    orig = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs.astype(np.float64):
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@dataclass
class LlamaHparams:
    n_ctx: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    n_vocab: int
    rope: dict = field(default_factory=dict)
    tie_embeddings: bool = False
    hf_architecture: str = "LlamaForCausalLM"

    # -- from an HF config ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, path=None) -> "LlamaHparams":
        """Validate ``config`` (an HF config.json dict) for GGUF ``llama`` and extract its numbers."""
        archs = config.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            if not archs and config.get("model_type") in ("llama", "mistral"):
                arch = "MistralForCausalLM" if config["model_type"] == "mistral" else "LlamaForCausalLM"
            else:
                shown = archs[0] if archs else config.get("model_type", "<none>")
                raise GGMergeError(
                    f"architecture '{shown}' is not supported (ggmerge converts "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)} to GGUF 'llama')"
                    f"{did_you_mean(shown, SUPPORTED_ARCHITECTURES)}", path=path, key="architectures")
        if "text_config" in config:
            raise GGMergeError("multimodal configs (text_config) are not supported", path=path, key="text_config")

        def need(keys: tuple[str, ...]):
            v = _first(config, keys)
            if v is None:
                raise GGMergeError("missing from config.json", path=path, key=keys[0])
            return v

        n_embd = int(need(("hidden_size", "n_embd", "dim")))
        n_head = int(need(("num_attention_heads", "n_head", "n_heads")))
        n_head_kv = int(_first(config, ("num_key_value_heads", "n_kv_heads"), n_head))
        head_dim = int(config.get("head_dim") or n_embd // n_head)
        for key in ("attention_bias", "mlp_bias"):
            if config.get(key):
                raise GGMergeError("bias tensors are not supported for the llama architecture",
                                   path=path, key=key)
        act = config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise GGMergeError(f"activation '{act}' is not supported (llama uses silu)", path=path, key="hidden_act")
        if n_head % n_head_kv:
            raise GGMergeError(f"num_attention_heads {n_head} is not a multiple of num_key_value_heads "
                               f"{n_head_kv}", path=path, key="num_key_value_heads")
        if head_dim % 2:
            raise GGMergeError(f"head dimension {head_dim} is odd; RoPE needs pairs", path=path, key="head_dim")

        rope = rope_parameters(config)
        rtype = str(rope["rope_type"]).lower()
        if rtype not in ("default", "linear", "yarn", "llama3", "dynamic"):
            raise GGMergeError(f"RoPE scaling '{rtype}' is not supported for llama GGUF", path=path,
                               key="rope_scaling")
        if rtype == "dynamic":
            # llama.cpp has no dynamic NTK scaling for llama; its converter drops it too
            log.warning("%s: dynamic RoPE scaling is not representable in GGUF; written without scaling",
                        path or "config")
        if rtype == "yarn" and "original_max_position_embeddings" not in rope:
            raise GGMergeError("yarn RoPE scaling needs original_max_position_embeddings", path=path,
                               key="rope_scaling")
        sw = config.get("sliding_window")
        n_ctx = int(need(("max_position_embeddings", "n_ctx", "n_positions", "max_sequence_length")))
        if sw and int(sw) < n_ctx and config.get("use_sliding_window", True):
            log.warning("%s: sliding_window=%s is not used by llama.cpp's llama architecture (full "
                        "attention); outputs differ only beyond %s tokens", path or "config", sw, sw)
        return cls(
            n_ctx=n_ctx,
            n_embd=n_embd,
            n_ff=int(need(("intermediate_size", "n_inner", "hidden_dim"))),
            n_layer=int(need(("num_hidden_layers", "n_layers", "n_layer", "num_layers"))),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            rms_eps=float(_first(config, ("rms_norm_eps", "norm_eps"), 1e-6)),
            n_vocab=int(need(("vocab_size",))),
            rope=rope,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            hf_architecture=arch,
        )

    # -- to GGUF --------------------------------------------------------------------------------
    def write(self, w: gguf.GGUFWriter, *, name: str | None, file_type: gguf.LlamaFileType) -> None:
        """Add general.* and llama.* hyper-parameter KVs (the architecture KV is the writer's own)."""
        w.add_type(gguf.GGUFType.MODEL)
        if name:
            w.add_name(name)
        w.add_vocab_size(self.n_vocab)
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_layer)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_rope_freq_base(float(self.rope["rope_theta"]))
        w.add_layer_norm_rms_eps(self.rms_eps)
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_rope_dimension_count(self.head_dim)
        rtype = str(self.rope["rope_type"]).lower()
        factor = self.rope.get("factor")
        if rtype == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif rtype == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            w.add_rope_scaling_orig_ctx_len(int(self.rope["original_max_position_embeddings"]))
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("attn_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if self.rope.get(key) is not None:
                    add(float(self.rope[key]))
        elif rtype == "llama3":
            # llama.cpp applies llama3 scaling through the rope_freqs tensor (see llama3_rope_factors);
            # the HF parameters travel in our own KV so a GGUF → HF conversion can restore them
            w.add_string(HF_ROPE_KEY, json.dumps(self.rope, sort_keys=True))
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def rope_freqs(self) -> np.ndarray | None:
        """The ``rope_freqs.weight`` tensor llama.cpp needs for llama3 scaling, else None."""
        if str(self.rope["rope_type"]).lower() == "llama3":
            return llama3_rope_factors(self.rope, self.head_dim)
        return None

    # -- from / to the other side ---------------------------------------------------------------
    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader, path=None) -> "LlamaHparams":
        def get(key: str, default=None, required=False):
            f = reader.get_field(key)
            if f is None:
                if required:
                    raise GGMergeError("missing GGUF metadata", path=path, key=key)
                return default
            return f.contents()

        arch = get("general.architecture", required=True)
        if arch != ARCH:
            raise GGMergeError(f"GGUF architecture '{arch}' is not supported (only '{ARCH}')", path=path,
                               key="general.architecture")
        a = ARCH

        def per_layer(key: str, default=None, required=False):
            v = get(key, default, required)
            if isinstance(v, list):
                if len(set(v)) != 1:
                    raise GGMergeError("per-layer values differ; not a llama-family model", path=path, key=key)
                v = v[0]
            return v

        def positive(key: str, v):
            # a damaged or hostile file may store any type here: a float, a string, zero
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise GGMergeError(f"must be a positive integer, got {v!r}", path=path, key=key)
            return v

        n_embd = positive(f"{a}.embedding_length", get(f"{a}.embedding_length", required=True))
        n_head = positive(f"{a}.attention.head_count", per_layer(f"{a}.attention.head_count", required=True))
        n_head_kv = positive(f"{a}.attention.head_count_kv", per_layer(f"{a}.attention.head_count_kv", n_head))
        head_dim = int(get(f"{a}.attention.key_length", get(f"{a}.rope.dimension_count", n_embd // n_head)))
        tokens = reader.get_field("tokenizer.ggml.tokens")
        n_vocab = get(f"{a}.vocab_size", len(tokens.data) if tokens is not None else None)
        if n_vocab is None:
            raise GGMergeError("no vocab size (neither llama.vocab_size nor tokenizer.ggml.tokens)",
                               path=path, key=f"{a}.vocab_size")
        rope: dict = {"rope_theta": _f32(get(f"{a}.rope.freq_base", 10000.0)), "rope_type": "default"}
        hf_rope = get(HF_ROPE_KEY)
        stype = get(f"{a}.rope.scaling.type")
        factor = get(f"{a}.rope.scaling.factor", get(f"{a}.rope.scale_linear"))
        if hf_rope:
            rope = json.loads(hf_rope)
        elif stype in ("linear", None) and factor not in (None, 0.0, 1.0):
            rope.update(rope_type="linear", factor=_f32(factor))
        elif stype == "yarn":
            rope.update(rope_type="yarn", factor=_f32(factor or 1.0))
            orig = get(f"{a}.rope.scaling.original_context_length")
            if orig is not None:
                rope["original_max_position_embeddings"] = int(orig)
            for key, name in (("extrapolation_factor", "yarn_ext_factor"),
                              ("attention_factor", "yarn_attn_factor"),
                              ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
                v = get(f"{a}.rope.scaling.{name}")
                if v is not None:
                    rope[key] = _f32(v)
        elif stype not in ("none", "linear", None):
            raise GGMergeError(f"RoPE scaling '{stype}' has no HF llama equivalent", path=path,
                               key=f"{a}.rope.scaling.type")
        return cls(
            n_ctx=int(get(f"{a}.context_length", 4096)),
            n_embd=n_embd,
            n_ff=int(per_layer(f"{a}.feed_forward_length", required=True)),
            n_layer=int(get(f"{a}.block_count", required=True)),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            rms_eps=_f32(get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            n_vocab=int(n_vocab),
            rope=rope,
            tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        )

    def to_config(self) -> dict:
        """An HF ``LlamaForCausalLM`` config.json dict (rope in both the v4 and v5 spellings)."""
        cfg = {
            "architectures": [self.hf_architecture],
            "model_type": "mistral" if self.hf_architecture == "MistralForCausalLM" else "llama",
            "hidden_act": "silu",
            "hidden_size": self.n_embd,
            "intermediate_size": self.n_ff,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head_kv,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.n_ctx,
            "rms_norm_eps": self.rms_eps,
            "vocab_size": self.n_vocab,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "rope_theta": float(self.rope["rope_theta"]),
        }
        if self.hf_architecture == "MistralForCausalLM":
            cfg["sliding_window"] = None
        if str(self.rope["rope_type"]) != "default":
            cfg["rope_scaling"] = {k: v for k, v in self.rope.items() if k != "rope_theta"}
        return cfg


def config_from_gguf(reader: gguf.GGUFReader) -> dict:
    """The HF config dict of a ``llama`` GGUF: hyper-parameters plus bos/eos/pad token ids."""
    hp = LlamaHparams.from_gguf(reader)
    cfg = hp.to_config()
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        f = reader.get_field(f"tokenizer.ggml.{name}_token_id")
        cfg[key] = int(f.contents()) if f is not None else None
    return cfg

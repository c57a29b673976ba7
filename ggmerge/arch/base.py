"""What every architecture family shares: the :class:`Family` base class and the :class:`Hparams` record.

A family object answers every architecture question the rest of ggmerge asks (see the package
docstring, :mod:`ggmerge.arch`, for the interface). The defaults here are the decoder-only
"llama-like" layout most families share: ``model.embed_tokens`` / ``model.layers.{i}.*`` /
``model.norm`` / ``lm_head`` with RMS norms, RoPE, GQA and a SiLU-gated MLP. A family module
subclasses :class:`Family` and overrides the data (tensor table, permuted tensors, refused config
keys) and the few functions that differ (extra KVs, config checks, shapes of its own tensors).

HF config ↔ GGUF KVs: which HF config keys feed which KV mirrors ``TextModel.set_gguf_parameters`` and
``LlamaModel.set_gguf_parameters`` in llama.cpp's convert_hf_to_gguf.py (conversion/base.py,
conversion/llama.py), including both RoPE spellings (transformers 4's ``rope_theta`` + ``rope_scaling``,
transformers 5's ``rope_parameters``); what llama.cpp reads back is ``llama_model_loader`` in
src/llama-model.cpp and src/models/<arch>.cpp.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import GGMergeError, did_you_mean

if TYPE_CHECKING:  # torch is not imported for the facts alone (quantizing a GGUF needs none)
    import torch

log = logging.getLogger(__name__)

#: our GGUF KV holding HF RoPE parameters llama.cpp has no KVs for (llama3: it gets rope_freqs
#: instead); llama.cpp ignores unknown keys, and GGUF → HF reads it back
HF_ROPE_KEY = "ggmerge.hf_rope_parameters"

#: GGUF tensors that llama.cpp's converter derives from config values (llama-3 RoPE scaling
#: frequency factors, Phi-3's LongRoPE factors); HF keeps them in config.json, so they are not
#: tensors of the model
DERIVED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

#: (head, embedding): a model without the head ties it to the embedding (every family names them so)
TIED_HEAD = ("lm_head.weight", "model.embed_tokens.weight")


def first_of(config: dict, keys: tuple[str, ...], default=None):
    """The first of ``keys`` present in ``config`` (HF configs spell the same thing many ways)."""
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


def f32(x) -> float:
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

    The smooth ramp of transformers' ``_compute_llama3_parameters``: wavelengths shorter than
    ``orig/high_freq_factor`` are kept, longer than ``orig/low_freq_factor`` divided by ``factor``,
    interpolated in between. Computed as the converter's ``LlamaModel.generate_extra_tensors`` computes
    it — torch float32 frequencies, wavelengths and ramp (a Python float divided by a float32 tensor
    stays float32) — so the tensor is bit for bit llama.cpp's converter's.
    """
    import torch

    base = float(params.get("rope_theta", 10000.0))
    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    orig = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return torch.tensor(out, dtype=torch.float32).numpy()


@dataclass
class Hparams:
    """A model's hyper-parameters, the meeting point of an HF config and GGUF KVs.

    Built by :meth:`Family.hparams` (from config.json, validated) or :meth:`Family.hparams_from_gguf`;
    written by :meth:`Family.write_kvs` / :meth:`Family.to_config`. ``extra`` holds what only some
    families have (Gemma's soft-capping, sliding-window pattern, …) under the family's own keys.
    """

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
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QuantHparams:
    """The hyper-parameters llama.cpp's quantization rules read (``llama_hparams`` / ``llm_type``)."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    arch: str = "llama"

    @property
    def n_gqa(self) -> int:
        # llama_hparams::n_gqa: 0 when there are no KV heads
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        # llama_quant_model_from_metadata (src/llama-quant.cpp): only the llama architecture with 80
        # layers and GQA is typed "70B", and only that type changes a rule (attn_v gets Q5_K)
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv


def quant_hparams_from_kv(arch: str, get: Callable[[str], object]) -> QuantHparams:
    """The hyper-parameters the type rules read, from GGUF metadata (``{arch}.block_count``, …).

    Generic over architectures (llama-quantize quantizes any architecture from the same KV names)."""
    def first(v):
        return v[0] if isinstance(v, (list, tuple)) and v else v

    n_layer = first(get(f"{arch}.block_count"))
    if n_layer is None:
        raise GGMergeError(f"metadata has no '{arch}.block_count'", key=f"{arch}.block_count")
    n_head = first(get(f"{arch}.attention.head_count")) or 0
    n_head_kv = first(get(f"{arch}.attention.head_count_kv"))
    return QuantHparams(n_layer=int(n_layer), n_head=int(n_head),
                        n_head_kv=int(n_head if n_head_kv is None else n_head_kv),
                        n_expert=int(first(get(f"{arch}.expert_count")) or 0), arch=arch)


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF (rotate-half) layout → GGUF (interleaved) layout, rows of ``w``
    (convert_hf_to_gguf.py's ``LlamaModel.permute``: (n_head, 2, head_dim/2, …) → swap axes 1, 2)."""
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


#: the per-layer tensors of the llama-like layout: HF suffix → (GGUF suffix, shape from Hparams)
LLAMA_LAYER = {
    "input_layernorm.weight": ("attn_norm.weight", lambda hp: (hp.n_embd,)),
    "self_attn.q_proj.weight": ("attn_q.weight", lambda hp: (hp.n_head * hp.head_dim, hp.n_embd)),
    "self_attn.k_proj.weight": ("attn_k.weight", lambda hp: (hp.n_head_kv * hp.head_dim, hp.n_embd)),
    "self_attn.v_proj.weight": ("attn_v.weight", lambda hp: (hp.n_head_kv * hp.head_dim, hp.n_embd)),
    "self_attn.o_proj.weight": ("attn_output.weight", lambda hp: (hp.n_embd, hp.n_head * hp.head_dim)),
    "post_attention_layernorm.weight": ("ffn_norm.weight", lambda hp: (hp.n_embd,)),
    "mlp.gate_proj.weight": ("ffn_gate.weight", lambda hp: (hp.n_ff, hp.n_embd)),
    "mlp.up_proj.weight": ("ffn_up.weight", lambda hp: (hp.n_ff, hp.n_embd)),
    "mlp.down_proj.weight": ("ffn_down.weight", lambda hp: (hp.n_embd, hp.n_ff)),
}

#: the tensors outside the blocks: HF name → (GGUF name, shape from (Hparams, embedding rows))
LLAMA_GLOBAL = {
    "model.embed_tokens.weight": ("token_embd.weight", lambda hp, rows: (rows, hp.n_embd)),
    "model.norm.weight": ("output_norm.weight", lambda hp, rows: (hp.n_embd,)),
    "lm_head.weight": ("output.weight", lambda hp, rows: (rows, hp.n_embd)),
}


class Family:
    """One architecture family. Subclass, set the class attributes, override what differs."""

    #: llama.cpp's ``general.architecture`` (the prefix of every hyper-parameter KV)
    gguf_arch: str = "llama"
    #: HF ``architectures`` entries this family reads and writes (the first is the default to write)
    hf_architectures: tuple[str, ...] = ()
    #: HF ``model_type`` → architecture, for configs without ``architectures``
    model_types: dict[str, str] = {}
    #: a short name for messages and the README table
    title: str = ""
    #: HF tensor names outside the blocks → (GGUF name, shape(hp, rows))
    global_tensors: dict = LLAMA_GLOBAL
    #: per-layer HF suffix (after ``model.layers.{i}.``) → (GGUF suffix, shape(hp)); all required
    layer_tensors: dict = LLAMA_LAYER
    #: per-layer tensors a checkpoint may hold or lack (biases of some fine-tunes, …), same form
    optional_layer_tensors: dict = {}
    #: HF suffixes stored rotary-permuted in GGUF → the config key giving their head count
    permuted: dict[str, str] = {}
    #: HF names of tensors that are indexed by token id (rows remapped by a union tokenizer)
    vocab_tensors: tuple[str, ...] = ("model.embed_tokens.weight", "lm_head.weight")
    #: the HF tensor an absent tied ``lm_head.weight`` is served from
    tied_head: tuple[str, str] = TIED_HEAD
    #: tensors written after the layers (mergekit's ``post_weights``: from the last slice)
    post_tensors: tuple[str, ...] = ("model.norm.weight", "lm_head.weight")
    #: tensors that are safe to ignore when present in a checkpoint
    ignored: tuple[re.Pattern, ...] = (re.compile(r".*\.rotary_emb\.inv_freq$"),)
    #: activations the family runs (``hidden_act`` / ``hidden_activation``)
    activations: tuple[str, ...] = ("silu", "swish")
    #: RoPE scaling types llama.cpp implements for this architecture
    rope_types: tuple[str, ...] = ("default", "linear", "yarn", "llama3", "dynamic")
    #: truthy config keys that mean tensors this family cannot hold: key → message
    refused_config: dict[str, str] = {}
    #: HF tensors a checkpoint may hold that llama.cpp's converter leaves out of the GGUF
    gguf_dropped: tuple[str, ...] = ()
    #: ``tokenizer.ggml.add_space_prefix`` llama.cpp's converter forces for this family (None: the
    #: tokenizer's own setting)
    add_space_prefix: bool | None = None

    def gguf_vocab(self, vocab):
        """The vocabulary as this family's GGUF stores it (Gemma: no dummy-prefix space)."""
        import dataclasses

        if self.add_space_prefix is None or vocab.add_space_prefix == self.add_space_prefix:
            return vocab
        return dataclasses.replace(vocab, add_space_prefix=self.add_space_prefix)

    # -- names ----------------------------------------------------------------------------------
    def __init__(self) -> None:
        table = [(h, g) for h, (g, _) in self.global_tensors.items()]
        for suffix, (gsuffix, _) in {**self.layer_tensors, **self.optional_layer_tensors}.items():
            table.append((f"model.layers.{{i}}.{suffix}", f"blk.{{i}}.{gsuffix}"))
        self._hf2gguf = [(_compile(h), g) for h, g in table]
        self._gguf2hf = [(_compile(g), h) for h, g in table]
        order = [g for g, _ in {**self.layer_tensors, **self.optional_layer_tensors}.values()]
        self._block_order = {g: k for k, g in enumerate(order)}

    def __repr__(self) -> str:
        return f"<family {self.gguf_arch}: {', '.join(self.hf_architectures)}>"

    def hf_to_gguf(self, name: str) -> str | None:
        """The GGUF name of HF tensor ``name`` (None if the family has no such tensor)."""
        for rx, out in self._hf2gguf:
            m = rx.match(name)
            if m:
                return out.format(i=m.group(1)) if m.groups() else out
        return None

    def gguf_to_hf(self, name: str) -> str | None:
        """The HF name of GGUF tensor ``name`` (None if the family has no such tensor)."""
        for rx, out in self._gguf2hf:
            m = rx.match(name)
            if m:
                return out.format(i=m.group(1)) if m.groups() else out
        return None

    def is_ignored(self, hf_name: str) -> bool:
        return any(rx.match(hf_name) for rx in self.ignored)

    def sort_key(self, gguf_name: str):
        """token_embd, blk.0.*, blk.1.*, …, output_norm, output — blocks numerically, not as strings.
        (llama.cpp looks tensors up by name; the order is only for people reading a tensor listing.)"""
        m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_name)
        if m:
            return (1, int(m.group(1)), self._block_order.get(m.group(2), 99), gguf_name)
        head = {"rope_freqs.weight": -1, "token_embd.weight": 0, "output_norm.weight": 2, "output.weight": 3}
        return (head.get(gguf_name, 4), 0, 0, gguf_name)

    # -- RoPE permutation -----------------------------------------------------------------------
    def heads_for_permute(self, hf_name: str, config: dict) -> int | None:
        """Head count to (un)permute ``hf_name`` with, or None if it is stored as in HF."""
        for suffix, key in self.permuted.items():
            if hf_name.endswith(suffix):
                n = config.get(key)
                if n is None and key == "num_key_value_heads":
                    n = config["num_attention_heads"]
                return int(n)
        return None

    permute = staticmethod(permute)
    unpermute = staticmethod(unpermute)

    def transformed(self, hf_name: str) -> bool:
        """Whether GGUF stores ``hf_name`` with other values or row order than HF does."""
        return any(hf_name.endswith(suffix) for suffix in self.permuted)

    def to_gguf(self, hf_name: str, w: torch.Tensor, heads: dict) -> torch.Tensor:
        """HF values of ``hf_name`` → what the GGUF stores (``heads``: a config dict with the head
        counts). The llama-like default re-interleaves the permuted tensors."""
        n = self.heads_for_permute(hf_name, heads)
        return w if n is None else self.permute(w, n)

    def from_gguf(self, hf_name: str, w: torch.Tensor, heads: dict, *, path=None, gguf_name=None) -> torch.Tensor:
        """GGUF values → HF values of ``hf_name``; the inverse of :meth:`to_gguf`, checking that the
        stored head count fits the tensor (a damaged file must not reshape into nonsense)."""
        n = self.heads_for_permute(hf_name, heads)
        if n is None:
            return w
        if n <= 0 or w.shape[0] % (2 * n):
            raise GGMergeError(f"{w.shape[0]} rows cannot be split into {n} RoPE heads of even size; "
                               "the head count in the metadata does not fit this tensor",
                               path=path, tensor=gguf_name or hf_name, key=f"{self.gguf_arch}.attention.head_count")
        return self.unpermute(w, n)

    # -- shapes ---------------------------------------------------------------------------------
    def expected_shapes(self, hp: Hparams, n_rows: int, present=()) -> dict[str, tuple[int, ...]]:
        """HF shape of every tensor a checkpoint must (or, for lm_head and the optional per-layer
        tensors present in ``present``, may) hold."""
        out = {h: shape(hp, n_rows) for h, (_, shape) in self.global_tensors.items()}
        present = set(present)
        for i in range(hp.n_layer):
            for suffix, (_, shape) in self.layer_tensors.items():
                out[f"model.layers.{i}.{suffix}"] = shape(hp)
            for suffix, (_, shape) in self.optional_layer_tensors.items():
                if f"model.layers.{i}.{suffix}" in present:
                    out[f"model.layers.{i}.{suffix}"] = shape(hp)
        return out

    def optional(self, hf_name: str) -> bool:
        """Whether a checkpoint may lack ``hf_name`` (lm_head when tied; optional per-layer tensors)."""
        if hf_name == self.tied_head[0]:
            return True
        return any(hf_name.endswith("." + s) for s in self.optional_layer_tensors)

    def extra_tensors(self, hp: Hparams) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
        """GGUF tensors derived from the config: (name, shape, load). Llama-3 RoPE's rope_freqs."""
        freqs = self.rope_freqs(hp)
        if freqs is None:
            return []
        return [("rope_freqs.weight", (hp.head_dim // 2,), lambda: self.rope_freqs(hp))]

    def rope_freqs(self, hp: Hparams) -> np.ndarray | None:
        """The ``rope_freqs.weight`` tensor llama.cpp needs for llama3 scaling, else None."""
        if str(hp.rope["rope_type"]).lower() == "llama3":
            return llama3_rope_factors(hp.rope, hp.head_dim)
        return None

    # -- HF config → Hparams --------------------------------------------------------------------
    def architecture_of(self, config: dict, path=None) -> str:
        archs = config.get("architectures") or []
        arch = next((a for a in archs if a in self.hf_architectures), None)
        if arch is None and not archs and config.get("model_type") in self.model_types:
            arch = self.model_types[config["model_type"]]
        if arch is None:
            shown = archs[0] if archs else config.get("model_type", "<none>")
            raise GGMergeError(f"architecture '{shown}' is not one of {', '.join(self.hf_architectures)}"
                               f"{did_you_mean(shown, self.hf_architectures)}", path=path, key="architectures")
        return arch

    def hparams(self, config: dict, path=None) -> Hparams:
        """Validate ``config`` (an HF config.json dict) for this family and extract its numbers."""
        arch = self.architecture_of(config, path)
        if "text_config" in config:
            raise GGMergeError("multimodal configs (text_config) are not supported", path=path, key="text_config")

        def need(keys: tuple[str, ...]):
            v = first_of(config, keys)
            if v is None:
                raise GGMergeError("missing from config.json", path=path, key=keys[0])
            return v

        n_embd = int(need(("hidden_size", "n_embd", "dim")))
        n_head = int(need(("num_attention_heads", "n_head", "n_heads")))
        n_head_kv = int(first_of(config, ("num_key_value_heads", "n_kv_heads"), n_head))
        head_dim = int(config.get("head_dim") or n_embd // n_head)
        for key, why in self.refused_config.items():
            if config.get(key):
                raise GGMergeError(why, path=path, key=key)
        act = first_of(config, ("hidden_act", "hidden_activation"), self.activations[0])
        if act not in self.activations:
            raise GGMergeError(f"activation '{act}' is not supported ({self.gguf_arch} uses "
                               f"{self.activations[0]})", path=path, key="hidden_act")
        if n_head % n_head_kv:
            raise GGMergeError(f"num_attention_heads {n_head} is not a multiple of num_key_value_heads "
                               f"{n_head_kv}", path=path, key="num_key_value_heads")
        if head_dim % 2:
            raise GGMergeError(f"head dimension {head_dim} is odd; RoPE needs pairs", path=path, key="head_dim")

        rope = rope_parameters(config)
        rtype = str(rope["rope_type"]).lower()
        if rtype not in self.rope_types:
            raise GGMergeError(f"RoPE scaling '{rtype}' is not supported for {self.gguf_arch} GGUF", path=path,
                               key="rope_scaling")
        if rtype == "dynamic":
            # llama.cpp has no dynamic NTK scaling for these architectures; its converter drops it too
            log.warning("%s: dynamic RoPE scaling is not representable in GGUF; written without scaling",
                        path or "config")
        if rtype == "yarn" and "original_max_position_embeddings" not in rope:
            raise GGMergeError("yarn RoPE scaling needs original_max_position_embeddings", path=path,
                               key="rope_scaling")
        n_ctx = int(need(("max_position_embeddings", "n_ctx", "n_positions", "max_sequence_length")))
        self.check_sliding_window(config, n_ctx, path)
        hp = Hparams(
            n_ctx=n_ctx,
            n_embd=n_embd,
            n_ff=int(need(("intermediate_size", "n_inner", "hidden_dim"))),
            n_layer=int(need(("num_hidden_layers", "n_layers", "n_layer", "num_layers"))),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            rms_eps=float(first_of(config, ("rms_norm_eps", "norm_eps"), 1e-6)),
            n_vocab=int(need(("vocab_size",))),
            rope=rope,
            tie_embeddings=bool(config.get("tie_word_embeddings", self.default_tied(config))),
            hf_architecture=arch,
        )
        self.read_extra(config, hp, path)
        return hp

    def default_tied(self, config: dict) -> bool:
        """``tie_word_embeddings`` when config.json does not say (transformers' per-class default)."""
        return False

    def check_sliding_window(self, config: dict, n_ctx: int, path) -> None:
        sw = config.get("sliding_window")
        if sw and int(sw) < n_ctx and config.get("use_sliding_window", True):
            log.warning("%s: sliding_window=%s is not used by llama.cpp's %s architecture (full "
                        "attention); outputs differ only beyond %s tokens", path or "config", sw,
                        self.gguf_arch, sw)

    def read_extra(self, config: dict, hp: Hparams, path) -> None:
        """Family-specific config values into ``hp.extra`` (checked here)."""

    # -- Hparams → GGUF KVs ---------------------------------------------------------------------
    def write_kvs(self, w, hp: Hparams, *, name: str | None, file_type) -> None:
        """Add general.* and ``{arch}.*`` hyper-parameter KVs (the architecture KV is the writer's own).

        The same keys for every family, in one order: what ``TextModel.set_gguf_parameters`` writes
        plus ``vocab_size``/``rope.dimension_count`` (``LlamaModel``'s; harmless where the loader
        defaults them) and the family's own (:meth:`write_extra`)."""
        import gguf

        w.add_type(gguf.GGUFType.MODEL)
        if name:
            w.add_name(name)
        w.add_vocab_size(hp.n_vocab)
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_rope_freq_base(float(hp.rope["rope_theta"]))
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        w.add_rope_dimension_count(hp.head_dim)
        rtype = str(hp.rope["rope_type"]).lower()
        factor = hp.rope.get("factor")
        if rtype == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif rtype == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            w.add_rope_scaling_orig_ctx_len(int(hp.rope["original_max_position_embeddings"]))
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("attn_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if hp.rope.get(key) is not None:
                    add(float(hp.rope[key]))
        elif rtype == "llama3":
            # llama.cpp applies llama3 scaling through the rope_freqs tensor (llama3_rope_factors);
            # the HF parameters travel in our own KV so a GGUF → HF conversion can restore them
            w.add_string(HF_ROPE_KEY, json.dumps(hp.rope, sort_keys=True))
        self.write_extra(w, hp)
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def write_extra(self, w, hp: Hparams) -> None:
        """The family's own KVs (soft-capping, sliding window, …), before general.file_type."""

    # -- GGUF KVs → Hparams ---------------------------------------------------------------------
    def hparams_from_gguf(self, reader, path=None) -> Hparams:
        """The hyper-parameters stored in a GGUF of this family's architecture."""
        def get(key: str, default=None, required=False):
            f = reader.get_field(key)
            if f is None:
                if required:
                    raise GGMergeError("missing GGUF metadata", path=path, key=key)
                return default
            return f.contents()

        arch = get("general.architecture", required=True)
        if arch != self.gguf_arch:
            raise GGMergeError(f"GGUF architecture '{arch}' is not '{self.gguf_arch}'", path=path,
                               key="general.architecture")
        a = self.gguf_arch

        def per_layer(key: str, default=None, required=False):
            v = get(key, default, required)
            if isinstance(v, list):
                if len(set(v)) != 1:
                    raise GGMergeError(f"per-layer values differ; not a {self.title or a} model", path=path,
                                       key=key)
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
            raise GGMergeError(f"no vocab size (neither {a}.vocab_size nor tokenizer.ggml.tokens)",
                               path=path, key=f"{a}.vocab_size")
        rope: dict = {"rope_theta": f32(get(f"{a}.rope.freq_base", 10000.0)), "rope_type": "default"}
        hf_rope = get(HF_ROPE_KEY)
        stype = get(f"{a}.rope.scaling.type")
        factor = get(f"{a}.rope.scaling.factor", get(f"{a}.rope.scale_linear"))
        if hf_rope:
            rope = json.loads(hf_rope)
        elif stype in ("linear", None) and factor not in (None, 0.0, 1.0):
            rope.update(rope_type="linear", factor=f32(factor))
        elif stype == "yarn":
            rope.update(rope_type="yarn", factor=f32(factor or 1.0))
            orig = get(f"{a}.rope.scaling.original_context_length")
            if orig is not None:
                rope["original_max_position_embeddings"] = int(orig)
            for key, name in (("extrapolation_factor", "yarn_ext_factor"),
                              ("attention_factor", "yarn_attn_factor"),
                              ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
                v = get(f"{a}.rope.scaling.{name}")
                if v is not None:
                    rope[key] = f32(v)
        elif stype not in ("none", "linear", None):
            raise GGMergeError(f"RoPE scaling '{stype}' has no HF {self.title or a} equivalent", path=path,
                               key=f"{a}.rope.scaling.type")
        hp = Hparams(
            n_ctx=int(get(f"{a}.context_length", 4096)),
            n_embd=n_embd,
            n_ff=int(per_layer(f"{a}.feed_forward_length", required=True)),
            n_layer=int(get(f"{a}.block_count", required=True)),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            rms_eps=f32(get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            n_vocab=int(n_vocab),
            rope=rope,
            tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
            hf_architecture=self.hf_architectures[0],
        )
        self.read_extra_gguf(reader, get, hp, path)
        return hp

    def read_extra_gguf(self, reader, get, hp: Hparams, path) -> None:
        """The family's own KVs (``get(key, default)``) or tensors (``reader.tensors``) into
        ``hp.extra`` (the inverse of :meth:`write_extra`)."""

    # -- Hparams → HF config --------------------------------------------------------------------
    def to_config(self, hp: Hparams) -> dict:
        """An HF config.json dict (rope in both the v4 and v5 spellings)."""
        cfg = {
            "architectures": [hp.hf_architecture],
            "model_type": self.model_type_of(hp.hf_architecture),
            "hidden_act": "silu",
            "hidden_size": hp.n_embd,
            "intermediate_size": hp.n_ff,
            "num_hidden_layers": hp.n_layer,
            "num_attention_heads": hp.n_head,
            "num_key_value_heads": hp.n_head_kv,
            "head_dim": hp.head_dim,
            "max_position_embeddings": hp.n_ctx,
            "rms_norm_eps": hp.rms_eps,
            "vocab_size": hp.n_vocab,
            "tie_word_embeddings": hp.tie_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "rope_theta": float(hp.rope["rope_theta"]),
        }
        if str(hp.rope["rope_type"]) != "default":
            cfg["rope_scaling"] = {k: v for k, v in hp.rope.items() if k != "rope_theta"}
        self.config_extra(cfg, hp)
        return cfg

    def model_type_of(self, hf_architecture: str) -> str:
        return next((t for t, a in self.model_types.items() if a == hf_architecture), self.gguf_arch)

    def config_extra(self, cfg: dict, hp: Hparams) -> None:
        """Family-specific config.json keys (the inverse of :meth:`read_extra`)."""

    def config_from_gguf(self, reader, path=None) -> dict:
        """The HF config dict of a GGUF of this family: hyper-parameters plus bos/eos/pad token ids."""
        cfg = self.to_config(self.hparams_from_gguf(reader, path))
        for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            f = reader.get_field(f"tokenizer.ggml.{name}_token_id")
            cfg[key] = int(f.contents()) if f is not None else None
        return cfg

    # -- quantization ---------------------------------------------------------------------------
    def quant_hparams(self, get: Callable[[str], object]) -> QuantHparams:
        """What llama-quantize's per-tensor rules read, from this family's KVs."""
        return quant_hparams_from_kv(self.gguf_arch, get)

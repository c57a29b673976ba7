"""Gemma-2 (GGUF ``gemma2``) and Gemma-3 text models (GGUF ``gemma3``).

What differs from the llama-like layout of :mod:`.base` (llama.cpp's convert_hf_to_gguf.py
``Gemma2Model`` / ``Gemma3Model`` in conversion/gemma.py; src/models/gemma2.cpp, gemma3.cpp;
transformers' modeling_gemma2 / modeling_gemma3):

* every RMS norm scales by ``1 + weight`` in HF (``Gemma2RMSNorm``: ``x * (1.0 + weight.float())``)
  and by ``weight`` in llama.cpp, so GGUF stores ``weight + 1`` (computed in float32 — the same
  rounding transformers does) and GGUF → HF subtracts it again; Gemma-3's per-head ``q_norm`` /
  ``k_norm`` are such norms too;
* four norms per block: ``input_layernorm`` → ``attn_norm``, ``post_attention_layernorm`` →
  ``post_attention_norm`` (after attention, not before the MLP as in Llama), ``pre_feedforward_layernorm``
  → ``ffn_norm``, ``post_feedforward_layernorm`` → ``post_ffw_norm``;
* no Q/K permutation (llama.cpp runs Gemma with NeoX RoPE, HF's rotate-half layout);
* the embedding is multiplied by sqrt(hidden) and the MLP is GELU(tanh)-gated — both in llama.cpp's
  graph, nothing in the file;
* the head is tied: Gemma-2's converter never writes ``output.weight`` (llama.cpp's gemma2 has none);
  Gemma-3 writes it only if the checkpoint has a separate ``lm_head``;
* soft-capping (Gemma-2: ``attn_logit_softcapping``, ``final_logit_softcapping``; Gemma-3 only the
  final one, when set) and sliding-window attention: ``attention.sliding_window`` with llama.cpp's
  default layer pattern (every 2nd layer full for Gemma-2, every 6th for Gemma-3, as transformers'
  default ``layer_types``); a config whose ``layer_types`` differ gets the per-layer
  ``attention.sliding_window_pattern`` array llama.cpp reads before its default;
* Gemma-3's local (sliding) layers have their own RoPE base (``rope.freq_base_swa``) and its global
  layers may be linearly scaled (the 4B–27B models' factor 8);
* llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models it
  recognises by layer count; it has no KV for ``query_pre_attn_scalar``. A config whose scalar is
  neither is refused; a frankenmerge of a 27B with another layer count gets a warning.
"""
from __future__ import annotations

import logging

from ..errors import GGMergeError
from .base import Family, Hparams, f32

log = logging.getLogger(__name__)

#: HF suffix → (GGUF suffix, shape) of one Gemma-2 block, in llama.cpp's converter order
_GEMMA2_LAYER = {
    "input_layernorm.weight": ("attn_norm.weight", lambda hp: (hp.n_embd,)),
    "self_attn.q_proj.weight": ("attn_q.weight", lambda hp: (hp.n_head * hp.head_dim, hp.n_embd)),
    "self_attn.k_proj.weight": ("attn_k.weight", lambda hp: (hp.n_head_kv * hp.head_dim, hp.n_embd)),
    "self_attn.v_proj.weight": ("attn_v.weight", lambda hp: (hp.n_head_kv * hp.head_dim, hp.n_embd)),
    "self_attn.o_proj.weight": ("attn_output.weight", lambda hp: (hp.n_embd, hp.n_head * hp.head_dim)),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", lambda hp: (hp.n_embd,)),
    "pre_feedforward_layernorm.weight": ("ffn_norm.weight", lambda hp: (hp.n_embd,)),
    "mlp.gate_proj.weight": ("ffn_gate.weight", lambda hp: (hp.n_ff, hp.n_embd)),
    "mlp.up_proj.weight": ("ffn_up.weight", lambda hp: (hp.n_ff, hp.n_embd)),
    "mlp.down_proj.weight": ("ffn_down.weight", lambda hp: (hp.n_embd, hp.n_ff)),
    "post_feedforward_layernorm.weight": ("post_ffw_norm.weight", lambda hp: (hp.n_embd,)),
}

_QK_NORM = {
    "self_attn.q_norm.weight": ("attn_q_norm.weight", lambda hp: (hp.head_dim,)),
    "self_attn.k_norm.weight": ("attn_k_norm.weight", lambda hp: (hp.head_dim,)),
}

_EMBED_AND_NORM = {
    "model.embed_tokens.weight": ("token_embd.weight", lambda hp, rows: (rows, hp.n_embd)),
    "model.norm.weight": ("output_norm.weight", lambda hp, rows: (hp.n_embd,)),
}
_HEAD = {"lm_head.weight": ("output.weight", lambda hp, rows: (rows, hp.n_embd))}

#: transformers' names for the tanh-approximated GELU Gemma uses (llama.cpp's LLM_FFN_GELU)
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")


def _is_norm(hf_name: str) -> bool:
    # the converter's test (``name.endswith("norm.weight")``): every RMS norm, incl. q_norm / k_norm
    return hf_name.endswith("norm.weight")


class _Gemma(Family):
    """What Gemma-2 and Gemma-3 share; the subclasses set the layer table and the KV details."""

    activations = _GELU_TANH
    rope_types = ("default",)
    # Gemma2Model / Gemma3Model.set_vocab: ``add_add_space_prefix(False)`` whatever the tokenizer says
    # (Gemma's SentencePiece model has no dummy prefix)
    add_space_prefix = False
    #: llama.cpp's default sliding-window layer pattern (``load_swa_pattern(ml, n)``): layer i is
    #: local unless i % n == n - 1 — transformers' default ``layer_types`` for the same model
    swa_period: int = 2
    #: llama.cpp's layer count of the 27B model (the one whose query scale is 1/sqrt(hidden/heads))
    n_layer_27b: int = 0

    # -- values: RMS norms scale by (1 + w) in HF, by w in llama.cpp --------------------------------
    def transformed(self, hf_name: str) -> bool:
        return _is_norm(hf_name) or super().transformed(hf_name)

    def to_gguf(self, hf_name, w, heads):
        w = super().to_gguf(hf_name, w, heads)
        return w.float() + 1.0 if _is_norm(hf_name) else w

    def from_gguf(self, hf_name, w, heads, *, path=None, gguf_name=None):
        w = super().from_gguf(hf_name, w, heads, path=path, gguf_name=gguf_name)
        return w.float() - 1.0 if _is_norm(hf_name) else w

    def default_tied(self, config: dict) -> bool:
        return True

    # -- config → hparams -------------------------------------------------------------------------
    def read_extra(self, config: dict, hp: Hparams, path) -> None:
        x = hp.extra
        sw = config.get("sliding_window")
        x["sliding_window"] = None if sw is None else int(sw)
        x["layer_types"] = self._layer_types(config, hp, path)
        x["final_logit_softcapping"] = config.get("final_logit_softcapping")
        scalar = config.get("query_pre_attn_scalar")
        x["query_pre_attn_scalar"] = None if scalar is None else float(scalar)
        self._check_query_scale(hp, path)

    def _layer_types(self, config: dict, hp: Hparams, path) -> list[str]:
        types = config.get("layer_types")
        if types is None:
            pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern"))
            period = int(pattern) if pattern else self.swa_period
            return [self._default_type(i, period) for i in range(hp.n_layer)]
        if not isinstance(types, list) or len(types) != hp.n_layer or \
                any(t not in ("sliding_attention", "full_attention") for t in types):
            raise GGMergeError(f"layer_types must list 'sliding_attention'/'full_attention' for each of "
                               f"the {hp.n_layer} layers", path=path, key="layer_types")
        return list(types)

    @staticmethod
    def _default_type(i: int, period: int) -> str:
        return "full_attention" if period and i % period == period - 1 else "sliding_attention"

    def default_layer_types(self, n_layer: int) -> list[str]:
        return [self._default_type(i, self.swa_period) for i in range(n_layer)]

    def _llama_cpp_query_scale(self, hp: Hparams) -> int:
        # llama_model_gemma{2,3}::load_arch_hparams: the 27B (known by its layer count) uses
        # 1/sqrt(n_embd/n_head), every other size 1/sqrt(head_dim)
        if hp.n_layer == self.n_layer_27b:
            return hp.n_embd // hp.n_head
        return hp.head_dim

    def _check_query_scale(self, hp: Hparams, path) -> None:
        scalar = hp.extra.get("query_pre_attn_scalar")
        if scalar is None:
            return
        used = self._llama_cpp_query_scale(hp)
        if scalar == used:
            return
        if scalar == hp.n_embd // hp.n_head:
            # a 27B-shaped model with another layer count (a frankenmerge): llama.cpp will use
            # 1/sqrt(head_dim); nothing in GGUF can say otherwise
            log.warning("%s: query_pre_attn_scalar %s is used by llama.cpp only for %d-layer models; this "
                        "%d-layer model will run with 1/sqrt(%d) attention scaling", path or "config", scalar,
                        self.n_layer_27b, hp.n_layer, hp.head_dim)
            return
        raise GGMergeError(f"query_pre_attn_scalar {scalar:g} cannot be expressed in GGUF: llama.cpp's "
                           f"{self.gguf_arch} scales queries by 1/sqrt({used:g})", path=path,
                           key="query_pre_attn_scalar")

    def check_sliding_window(self, config: dict, n_ctx: int, path) -> None:
        """Gemma's sliding window is llama.cpp's too (written as KVs): nothing to warn about."""

    # -- hparams → KVs ------------------------------------------------------------------------------
    def write_swa_pattern(self, w, hp: Hparams) -> None:
        """The per-layer pattern KV, only when it is not llama.cpp's default for this architecture."""
        types = hp.extra.get("layer_types")
        if types and types != self.default_layer_types(hp.n_layer):
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])

    def read_swa_gguf(self, get, hp: Hparams) -> None:
        a = self.gguf_arch
        pattern = get(f"{a}.attention.sliding_window_pattern")
        if isinstance(pattern, list):
            if len(pattern) != hp.n_layer:
                raise GGMergeError(f"{len(pattern)} entries for {hp.n_layer} layers",
                                   key=f"{a}.attention.sliding_window_pattern")
            hp.extra["layer_types"] = ["sliding_attention" if bool(p) else "full_attention" for p in pattern]
        elif isinstance(pattern, int) and pattern > 0:
            hp.extra["layer_types"] = [self._default_type(i, pattern) for i in range(hp.n_layer)]
        else:
            hp.extra["layer_types"] = self.default_layer_types(hp.n_layer)

    def config_extra(self, cfg: dict, hp: Hparams) -> None:
        x = hp.extra
        cfg.pop("hidden_act", None)
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        cfg["query_pre_attn_scalar"] = int(self._llama_cpp_query_scale(hp))
        cfg["sliding_window"] = x.get("sliding_window")
        cfg["layer_types"] = x.get("layer_types") or self.default_layer_types(hp.n_layer)
        cfg["final_logit_softcapping"] = x.get("final_logit_softcapping")
        cfg["attention_bias"] = False


class Gemma2(_Gemma):
    gguf_arch = "gemma2"
    title = "Gemma-2"
    hf_architectures = ("Gemma2ForCausalLM",)
    model_types = {"gemma2": "Gemma2ForCausalLM"}
    # llama.cpp's gemma2 has no output tensor (it always reuses token_embd): the converter skips an
    # lm_head a checkpoint holds anyway (tie_word_embeddings false is refused in read_extra). Merges
    # keep it, as mergekit does (its gemma2.json: optional, tied to the embedding)
    global_tensors = {**_EMBED_AND_NORM, **_HEAD}
    gguf_dropped = ("lm_head.weight",)
    layer_tensors = _GEMMA2_LAYER
    swa_period = 2
    n_layer_27b = 46

    def read_extra(self, config: dict, hp: Hparams, path) -> None:
        if not hp.tie_embeddings:
            raise GGMergeError("llama.cpp's gemma2 always ties the output head to the embedding; "
                               "tie_word_embeddings: false cannot be converted", path=path,
                               key="tie_word_embeddings")
        super().read_extra(config, hp, path)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is None:
                # llama.cpp's gemma2 always soft-caps (defaults 50 / 30 when the KV is absent)
                raise GGMergeError(f"{key} is null, but llama.cpp's gemma2 always soft-caps", path=path, key=key)
            hp.extra[key] = float(config[key])
        if hp.extra["sliding_window"] is None:
            raise GGMergeError("missing from config.json (llama.cpp's gemma2 would use 4096)", path=path,
                               key="sliding_window")
        if float(hp.rope["rope_theta"]) != 10000.0:
            # Gemma2Model writes no rope KV; llama.cpp then uses 10000 — so write it (below)
            log.info("%s: rope_theta %s written as gemma2.rope.freq_base", path or "config", hp.rope["rope_theta"])

    def write_kvs(self, w, hp: Hparams, *, name: str | None, file_type) -> None:
        """The KVs ``Gemma2Model.set_gguf_parameters`` writes, in its order (it does not call the base
        class: no vocab size, RoPE base or dimension count — llama.cpp's defaults are Gemma-2's)."""
        import gguf

        w.add_type(gguf.GGUFType.MODEL)
        if name:
            w.add_name(name)
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        w.add_file_type(int(file_type))
        w.add_attn_logit_softcapping(hp.extra["attn_logit_softcapping"])
        w.add_final_logit_softcapping(hp.extra["final_logit_softcapping"])
        w.add_sliding_window(hp.extra["sliding_window"])
        if float(hp.rope["rope_theta"]) != 10000.0:
            w.add_rope_freq_base(float(hp.rope["rope_theta"]))
        self.write_swa_pattern(w, hp)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def read_extra_gguf(self, reader, get, hp: Hparams, path) -> None:
        a = self.gguf_arch
        hp.tie_embeddings = True
        hp.extra["attn_logit_softcapping"] = f32(get(f"{a}.attn_logit_softcapping", 50.0))
        hp.extra["final_logit_softcapping"] = f32(get(f"{a}.final_logit_softcapping", 30.0))
        hp.extra["sliding_window"] = int(get(f"{a}.attention.sliding_window", 4096))
        self.read_swa_gguf(get, hp)

    def config_extra(self, cfg: dict, hp: Hparams) -> None:
        super().config_extra(cfg, hp)
        cfg["model_type"] = "gemma2"
        cfg["attn_logit_softcapping"] = hp.extra.get("attn_logit_softcapping")
        cfg["tie_word_embeddings"] = True


class Gemma3(_Gemma):
    gguf_arch = "gemma3"
    title = "Gemma-3 (text)"
    hf_architectures = ("Gemma3ForCausalLM",)
    model_types = {"gemma3_text": "Gemma3ForCausalLM"}
    global_tensors = {**_EMBED_AND_NORM, **_HEAD}
    layer_tensors = {**{k: v for k, v in _GEMMA2_LAYER.items() if k == "input_layernorm.weight"},
                     "self_attn.q_proj.weight": _GEMMA2_LAYER["self_attn.q_proj.weight"],
                     "self_attn.q_norm.weight": _QK_NORM["self_attn.q_norm.weight"],
                     "self_attn.k_proj.weight": _GEMMA2_LAYER["self_attn.k_proj.weight"],
                     "self_attn.k_norm.weight": _QK_NORM["self_attn.k_norm.weight"],
                     **{k: v for k, v in _GEMMA2_LAYER.items()
                        if k not in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight")}}
    rope_types = ("default", "linear")
    swa_period = 6
    n_layer_27b = 62

    def hparams(self, config: dict, path=None) -> Hparams:
        # transformers 5 nests RoPE per attention type; the global layers' settings are the model's
        # (TextModel.set_gguf_parameters reads ``rope_parameters["full_attention"]``)
        params = config.get("rope_parameters") or {}
        local_theta = config.get("rope_local_base_freq")
        if "full_attention" in params:
            local_theta = (params.get("sliding_attention") or {}).get("rope_theta", local_theta)
            config = {**config, "rope_parameters": params["full_attention"]}
            config.pop("rope_scaling", None)
        hp = super().hparams(config, path)
        hp.extra["rope_local_theta"] = None if local_theta is None else float(local_theta)
        return hp

    def read_extra(self, config: dict, hp: Hparams, path) -> None:
        super().read_extra(config, hp, path)
        if config.get("attn_logit_softcapping") is not None:
            raise GGMergeError("Gemma-3 has no attention soft-capping (llama.cpp's gemma3 has none)",
                               path=path, key="attn_logit_softcapping")
        cap = hp.extra.get("final_logit_softcapping")
        hp.extra["final_logit_softcapping"] = float(cap) if cap else None
        # Gemma3Model: ``sliding_window_pattern != 1`` writes the window (1 = every layer global)
        hp.extra["use_swa"] = config.get("sliding_window_pattern") != 1 and hp.extra["sliding_window"] is not None

    def write_kvs(self, w, hp: Hparams, *, name: str | None, file_type) -> None:
        """The KVs ``Gemma3Model.set_gguf_parameters`` writes (the base class's then its own), in order."""
        import gguf

        w.add_type(gguf.GGUFType.MODEL)
        if name:
            w.add_name(name)
        w.add_block_count(hp.n_layer)
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        if str(hp.rope["rope_type"]).lower() == "linear" and hp.rope.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(hp.rope["factor"]))
        w.add_rope_freq_base(float(hp.rope["rope_theta"]))
        if hp.extra.get("rope_local_theta") is not None:
            w.add_rope_freq_base_swa(hp.extra["rope_local_theta"])
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        w.add_file_type(int(file_type))
        if hp.extra.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(hp.extra["final_logit_softcapping"])
        if hp.extra.get("use_swa"):
            w.add_sliding_window(hp.extra["sliding_window"])
            self.write_swa_pattern(w, hp)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def read_extra_gguf(self, reader, get, hp: Hparams, path) -> None:
        a = self.gguf_arch
        cap = get(f"{a}.final_logit_softcapping")
        hp.extra["final_logit_softcapping"] = f32(cap) if cap else None
        sw = get(f"{a}.attention.sliding_window")
        hp.extra["use_swa"] = bool(sw)
        hp.extra["sliding_window"] = int(sw) if sw else None
        # llama.cpp's default local base (llama_hparams::rope_freq_base_train_swa) is 10000
        hp.extra["rope_local_theta"] = f32(get(f"{a}.rope.freq_base_swa", 10000.0))
        if sw:
            self.read_swa_gguf(get, hp)
        else:
            hp.extra["layer_types"] = ["full_attention"] * hp.n_layer

    def config_extra(self, cfg: dict, hp: Hparams) -> None:
        super().config_extra(cfg, hp)
        cfg["model_type"] = "gemma3_text"
        cfg["attn_logit_softcapping"] = None
        if not hp.extra.get("use_swa"):
            cfg["sliding_window_pattern"] = 1
        full = {"rope_type": "default", "rope_theta": float(hp.rope["rope_theta"])}
        if str(hp.rope["rope_type"]) == "linear":
            full.update(rope_type="linear", factor=float(hp.rope["factor"]))
        local = {"rope_type": "default", "rope_theta": float(hp.extra.get("rope_local_theta") or 10000.0)}
        cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        # transformers 4 spelling of the same
        cfg["rope_local_base_freq"] = local["rope_theta"]
        cfg.pop("rope_scaling", None)
        if full["rope_type"] == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": full["factor"]}


GEMMA2 = Gemma2()
GEMMA3 = Gemma3()

"""Architecture knowledge, one module per family: the only place that knows what a model looks like.

Everything architecture-specific that sources, the plan, the evaluator, the converter (HF ↔ GGUF) and
the quantizer need is asked of a **family object**; nothing outside this package spells an HF or GGUF
tensor name of a particular architecture or a ``{arch}.*`` KV.

Using it
--------
* ``family_for(config, path=None)`` — the family of an HF ``config.json`` dict (by ``architectures``,
  else ``model_type``); a clear :class:`~ggmerge.errors.GGMergeError` (key ``architectures``) for an
  unsupported one.
* ``family_for_gguf(arch, path=None)`` — the family of a GGUF ``general.architecture``.
* ``FAMILIES`` — every family, in README order; ``BY_HF`` / ``BY_GGUF`` — the two lookup tables.

What a family answers (:class:`~ggmerge.arch.base.Family`; defaults are the llama-like layout)
---------------------------------------------------------------------------------------------------
names        ``hf_to_gguf(name)``, ``gguf_to_hf(name)`` (None: not a tensor of this family),
             ``is_ignored(hf_name)``, ``sort_key(gguf_name)`` (file order of our GGUFs)
structure    ``expected_shapes(hp, n_rows, present)`` (HF name → shape, every tensor a checkpoint
             must hold; optional per-layer tensors when ``present``), ``optional(hf_name)``,
             ``vocab_tensors`` (rows indexed by token id), ``tied_head`` (``lm_head`` served from
             ``embed_tokens`` when absent), ``post_tensors`` (mergekit's ``post_weights``: taken from
             the last slice), ``extra_tensors(hp)`` (GGUF tensors derived from the config, e.g.
             ``rope_freqs``, Phi-3's ``rope_factors_long/short``), ``gguf_dropped`` (HF tensors the
             converter leaves out of the GGUF: Gemma-2's tied ``lm_head``)
layout       ``heads_for_permute(hf_name, config)`` → head count or None, ``permute(w, n)`` (HF → GGUF
             rows), ``unpermute(w, n)`` (GGUF → HF); ``to_gguf(hf_name, w, heads)`` /
             ``from_gguf(hf_name, w, heads, path=)`` apply whatever the family does to a tensor's
             values between HF and GGUF (the llama permutation; Gemma's norm + 1) and
             ``transformed(hf_name)`` says whether it does anything (else rows stream through).
             Fused tensors (Phi-3's qkv_proj, gate_up_proj) are whole tensors under both names, as
             in mergekit and llama.cpp: only the name table knows them
hparams      ``hparams(config, path)`` → :class:`~ggmerge.arch.base.Hparams` (validated: unsupported
             features are refused here, at plan time); ``write_kvs(writer, hp, name=, file_type=)``;
             ``hparams_from_gguf(reader, path)``; ``to_config(hp)``; ``config_from_gguf(reader)``
vocabulary   ``gguf_vocab(vocab)`` — the vocabulary as the family's GGUF stores it (``add_space_prefix``
             forced by the converter: Gemma writes false)
quant facts  ``quant_hparams(get)`` → :class:`~ggmerge.arch.base.QuantHparams` (what llama-quantize's
             per-tensor rules read)

Adding a family
---------------
1. A module ``ggmerge/arch/<family>.py`` with a :class:`~ggmerge.arch.base.Family` subclass: set
   ``gguf_arch``, ``hf_architectures``, ``model_types``, ``title``; the tensor tables
   (``global_tensors``, ``layer_tensors``, ``optional_layer_tensors``: HF name/suffix → (GGUF
   name/suffix, shape function of :class:`Hparams`)); ``permuted``; ``refused_config``. Override only
   what differs: ``read_extra`` / ``write_extra`` / ``read_extra_gguf`` / ``config_extra`` for KVs of
   its own (keep them in ``hp.extra``), ``check_sliding_window``, ``default_tied``, ``activations``.
   Put one instance in a module-level ``FAMILY`` (or several, e.g. ``QWEN2``/``QWEN3``).
2. Add the instance(s) to ``FAMILIES`` below.
3. Tests (tests/test_architectures.py): a tiny random model from a transformers config whose F32 GGUF
   gives transformers' logits in llama.cpp; a merge equal to mergekit's; Q4_K_M equal to
   llama_model_quantize's. Then a row in README's table of supported architectures.
"""
from __future__ import annotations

from ..errors import GGMergeError, did_you_mean
from .base import DERIVED, TIED_HEAD, Family, Hparams, QuantHparams, quant_hparams_from_kv  # noqa: F401
from . import gemma, llama, phi3, qwen2

#: every supported family
FAMILIES: tuple[Family, ...] = (llama.FAMILY, qwen2.QWEN2, qwen2.QWEN3, gemma.GEMMA2, gemma.GEMMA3, phi3.PHI3)

#: HF ``architectures`` entry → family
BY_HF: dict[str, Family] = {a: f for f in FAMILIES for a in f.hf_architectures}
#: GGUF ``general.architecture`` → family
BY_GGUF: dict[str, Family] = {f.gguf_arch: f for f in FAMILIES}
#: HF ``model_type`` → family (configs without ``architectures``)
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def is_ignored(hf_name: str) -> bool:
    """Whether a checkpoint tensor is ignored by every family (buffers recomputed by the model, such
    as ``rotary_emb.inv_freq``): a source can drop it before it knows the model's family."""
    return all(f.is_ignored(hf_name) for f in FAMILIES)


def served_name(name: str, names) -> str:
    """The tensor a model serves for ``name``: one with tied embeddings has no ``lm_head`` of its own
    and serves its embedding (mergekit's ``tied_names``; the same two names in every family)."""
    head, embed = TIED_HEAD
    if name == head and name not in names:
        return embed
    return name


def family_for(config: dict, path=None) -> Family:
    """The family of an HF config dict, by ``architectures`` (else ``model_type``)."""
    archs = config.get("architectures") or []
    for a in archs:
        if a in BY_HF:
            return BY_HF[a]
    if not archs and config.get("model_type") in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[config["model_type"]]
    shown = archs[0] if archs else config.get("model_type") or "(none in config.json)"
    raise GGMergeError(
        f"architecture '{shown}' is not supported (supported: {', '.join(sorted(BY_HF))})"
        f"{did_you_mean(str(shown), BY_HF)}",
        path=path, key="architectures",
    )


def family_for_gguf(arch, path=None) -> Family:
    """The family of a GGUF ``general.architecture`` value."""
    fam = BY_GGUF.get(arch) if isinstance(arch, str) else None
    if fam is None:
        raise GGMergeError(
            f"unsupported GGUF architecture '{arch}' (ggmerge reads {', '.join(repr(a) for a in BY_GGUF)})",
            path=path, key="general.architecture")
    return fam


def config_from_gguf(reader, path=None) -> dict:
    """The HF config dict of a GGUF (its family's :meth:`~ggmerge.arch.base.Family.config_from_gguf`)."""
    f = reader.get_field("general.architecture")
    if f is None:
        raise GGMergeError("missing GGUF metadata", path=path, key="general.architecture")
    return family_for_gguf(f.contents(), path=path).config_from_gguf(reader, path)

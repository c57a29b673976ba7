"""Hugging Face model → GGUF file that llama.cpp reads as transformers does (every :mod:`ggmerge.arch` family).

Two levels:

* :func:`plan_gguf` turns any :class:`~ggmerge.sources.base.TensorSource` (an HF folder, a GGUF, a
  merge result), its :class:`~ggmerge.tokenizer.vocab.Vocab` and config into the metadata callback and
  the list of :class:`~ggmerge.convert.gguf_out.OutTensor` jobs. Every name, shape, type and vocabulary
  problem is found here, before a byte is written.
* :func:`convert_hf` is the ``ggmerge convert HF_DIR -o OUT.gguf`` verb: open, plan, write.

What the plan does to each tensor mirrors llama.cpp's convert_hf_to_gguf.py (``LlamaModel``,
``Qwen2Model``, …), with every architecture fact asked of the model's family (:mod:`ggmerge.arch`):
HF → GGUF names; values changed on the way (``Family.to_gguf``: the llama Q/K re-interleaving,
``LlamaModel.permute``); 1-D tensors (norms, biases, rope_freqs) always F32 (``prepare_tensors``:
"Most of the codebase that takes in 1D tensors or norms only handles F32"); no ``output.weight`` when
the embeddings are tied (llama.cpp then reuses ``token_embd``); tensors derived from the config
(``rope_freqs.weight`` for llama3 RoPE scaling, ``generate_extra_tensors``).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ggmerge.arch import Family, Hparams, family_for
from ggmerge.errors import GGMergeError, did_you_mean
from ggmerge.sources import open_source
from ggmerge.tokenizer.gguf_vocab import padded
from ggmerge.tokenizer.gguf_vocab import write_vocab
from ggmerge.tokenizer.hf_vocab import read_hf
from ggmerge.tokenizer.templates import choose_template

from .gguf_out import OutTensor, encoded_nbytes, write_gguf

log = logging.getLogger(__name__)

QType = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

#: --outtype choices: (tensor type for ≥2-D weights, general.file_type)
OUTTYPES: dict[str, tuple[QType, F]] = {
    "f32": (QType.F32, F.ALL_F32),
    "f16": (QType.F16, F.MOSTLY_F16),
    "bf16": (QType.BF16, F.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, F.MOSTLY_Q8_0),
}

#: a policy maps (gguf name, numpy shape) to the tensor type, or is one of OUTTYPES, or a mapping
#: gguf name → type / (type, reason) such as convert.quants.policy.choose_types returns
Policy = str | Callable[[str, tuple[int, ...]], QType] | Mapping[str, object]

def parse_outtype(outtype: str) -> tuple[QType, F]:
    try:
        return OUTTYPES[str(outtype).lower()]
    except KeyError:
        raise GGMergeError(f"unknown output type '{outtype}' (choose from {', '.join(OUTTYPES)})"
                           f"{did_you_mean(str(outtype).lower(), OUTTYPES)}", key="outtype") from None


def _type_chooser(policy: Policy) -> Callable[[str, tuple[int, ...]], tuple[QType, str | None]]:
    """Normalise the accepted policy forms to ``(gguf_name, shape) -> (type, reason)``."""
    if isinstance(policy, str):
        qtype, _ = parse_outtype(policy)

        def by_outtype(name: str, shape: tuple[int, ...]) -> tuple[QType, str | None]:
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if shape[-1] % block:
                # the converter's QuantError fallback, but announced
                return QType.F16, f"row length {shape[-1]} is not a multiple of {qtype.name}'s block {block}"
            return qtype, None

        return by_outtype
    if isinstance(policy, Mapping):
        def by_table(name: str, shape: tuple[int, ...]) -> tuple[QType, str | None]:
            if name not in policy:
                raise GGMergeError("the type policy has no entry for this tensor", tensor=name)
            v = policy[name]
            if isinstance(v, tuple):
                return QType(v[0]), (v[1] if len(v) > 1 else None)
            return QType(getattr(v, "qtype", v)), getattr(v, "reason", None)

        return by_table
    if callable(policy):
        return lambda name, shape: (QType(policy(name, shape)), None)
    raise TypeError(f"unsupported outtype policy {policy!r}")


def file_type_of(types: list[QType]) -> F:
    """general.file_type for a mixture: the type most ≥2-D weights got (llama.cpp labels files so)."""
    by_qtype = {q: f for q, f in OUTTYPES.values()}
    if not types:
        return F.ALL_F32
    common = max(set(types), key=types.count)
    if common in by_qtype:
        return by_qtype[common]
    try:
        return F[f"MOSTLY_{common.name}"]
    except KeyError:
        return F.GUESSED


@dataclass
class _Layout:
    """A source checked against its config: family, hyper-parameters, embedding rows and the tensors
    to write as (hf name or None for derived ones, gguf name, numpy shape), in file order."""

    family: Family
    hp: Hparams
    n_rows: int
    tensors: list[tuple[str | None, str, tuple[int, ...]]]


def _layout(source, config: dict) -> _Layout:
    where = getattr(source, "path", None)
    fam = family_for(config, path=where)
    hp = fam.hparams(config, path=where)
    names = list(source.names())
    embed, head = "model.embed_tokens.weight", fam.tied_head[0]
    if embed not in names:
        raise GGMergeError("no embedding tensor", path=where, tensor=embed)
    n_rows = int(source.shape(embed)[0])
    if n_rows != hp.n_vocab:
        log.warning("%s: config vocab_size %d differs from the embedding's %d rows; using %d",
                    where, hp.n_vocab, n_rows, n_rows)
        hp.n_vocab = n_rows
    expected = fam.expected_shapes(hp, n_rows, present=names)
    if head not in names and not hp.tie_embeddings:
        raise GGMergeError(f"no {head} and tie_word_embeddings is false", path=where, tensor=head)
    missing = [n for n in expected if n not in names and not fam.optional(n)]
    if missing:
        raise GGMergeError(f"missing {len(missing)} tensor(s) the {fam.gguf_arch} architecture needs",
                           path=where, tensor=missing[0])
    tensors: list[tuple[str | None, str, tuple[int, ...]]] = []
    for hf in names:
        if fam.is_ignored(hf):
            continue
        if hf in fam.gguf_dropped:  # e.g. Gemma-2's tied lm_head: llama.cpp's gemma2 has no output tensor
            log.info("%s: %s is not written (llama.cpp's %s reuses the embedding)", where, hf, fam.gguf_arch)
            continue
        gname = fam.hf_to_gguf(hf)
        if gname is None or hf not in expected:
            raise GGMergeError(f"tensor is not part of the {fam.gguf_arch} architecture (unsupported layout?)"
                               f"{did_you_mean(hf, expected)}", path=where, tensor=hf)
        shape = tuple(int(d) for d in source.shape(hf))
        if shape != expected[hf]:
            raise GGMergeError(f"shape {shape} does not match the config (expected {expected[hf]})",
                               path=where, tensor=hf)
        tensors.append((hf, gname, shape))
    for gname, shape, _ in fam.extra_tensors(hp):
        tensors.append((None, gname, shape))
    tensors.sort(key=lambda t: fam.sort_key(t[1]))
    return _Layout(fam, hp, n_rows, tensors)


def planned_tensors(source, config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy shape) of every tensor :func:`plan_gguf` would write, in file order.

    For type policies that need the whole list first (llama.cpp's mixtures count attn_v/ffn_down
    layers): ``types = choose_types(..., planned_tensors(src, cfg), ...)`` then
    ``plan_gguf(src, vocab, cfg, types, file_type=...)``.
    """
    return [(g, shape) for _, g, shape in _layout(source, config).tensors]


def plan_gguf(
    source,
    vocab,
    config: dict,
    outtype_policy: Policy = "bf16",
    *,
    name: str | None = None,
    file_type: F | None = None,
) -> tuple[Callable[[gguf.GGUFWriter], None], list[OutTensor]]:
    """Metadata callback and tensor jobs for writing ``source`` as a GGUF file of its family's
    architecture (:func:`gguf_arch`).

    ``vocab`` is written as the tokenizer (its ``chat_template`` included), padded with ``[PAD{id}]``
    entries up to the embedding's row count. ``outtype_policy`` is an outtype name ('f32', 'f16',
    'bf16', 'q8_0'), a mapping gguf name → type (or (type, reason), e.g. policy ``Choice``s), or a
    callable ``(gguf_name, shape) -> type``; 1-D tensors are F32 whatever it says. ``file_type``
    sets ``general.file_type`` (default: the outtype's, or the commonest weight type's).
    """
    where = getattr(source, "path", None)
    layout = _layout(source, config)
    fam, hp, n_rows = layout.family, layout.hp, layout.n_rows
    derived = {g: load for g, _, load in fam.extra_tensors(hp)}
    # vocabulary problems surface now, not after the output file is opened
    try:
        padded(vocab, n_rows)
    except GGMergeError as exc:
        exc.path = exc.path or where
        raise

    choose = _type_chooser(outtype_policy)
    heads = {"num_attention_heads": hp.n_head, "num_key_value_heads": hp.n_head_kv}
    jobs: list[OutTensor] = []
    weight_types: list[QType] = []
    for hf, gname, shape in layout.tensors:
        if len(shape) == 1:
            qtype, reason = QType.F32, None
        else:
            qtype, reason = choose(gname, shape)
            weight_types.append(qtype)
        if reason:
            log.warning("%s: %s → %s (%s)", where, gname, qtype.name, reason)
        try:
            encoded_nbytes(shape, qtype)
        except ValueError as exc:
            raise GGMergeError(f"cannot store as {qtype.name}: {exc}", path=where, tensor=hf or gname) from None
        if hf is None:  # derived from the config (rope_freqs)
            jobs.append(OutTensor(gname, shape, qtype, derived[gname]))
        else:
            jobs.append(OutTensor(gname, shape, qtype, _loader(source, fam, hf, heads)))

    if file_type is None:
        file_type = parse_outtype(outtype_policy)[1] if isinstance(outtype_policy, str) else file_type_of(weight_types)

    def metadata(writer: gguf.GGUFWriter) -> None:
        fam.write_kvs(writer, hp, name=name, file_type=file_type)
        try:
            write_vocab(writer, fam.gguf_vocab(vocab), n_rows)
        except GGMergeError as exc:
            exc.path = exc.path or where
            raise

    return metadata, jobs


def _loader(source, fam: Family, hf_name: str, heads: dict) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return fam.to_gguf(hf_name, source.load(hf_name), heads).numpy()

    return load


def gguf_arch(config: dict, path=None) -> str:
    """The GGUF ``general.architecture`` a model of this HF config is written as."""
    return family_for(config, path=path).gguf_arch


def converted_path(hf_dir: Path, out: Path, outtype: str) -> Path:
    """``out`` itself, or ``out/<model>-<OUTTYPE>.gguf`` when ``out`` is an existing folder."""
    if out.is_dir():
        return out / f"{hf_dir.name}-{outtype.upper()}.gguf"
    return out


def convert_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "bf16",
               chat_template: str | None = None) -> Path:
    """Convert an HF model folder to a GGUF file; returns the path written.

    ``chat_template`` is 'vicuna', a template file, or None to keep the model's own template.
    """
    hf_dir = Path(hf_dir)
    parse_outtype(outtype)
    out = converted_path(hf_dir, Path(out), outtype)
    source = open_source(hf_dir)
    try:
        config = source.config()
        tok_dir = source.tokenizer_dir()
        if tok_dir is None:
            raise GGMergeError("no tokenizer files (tokenizer.model or tokenizer.json); llama.cpp needs "
                               "the vocabulary inside the GGUF", path=hf_dir)
        vocab = read_hf(tok_dir)
        vocab.chat_template = choose_template(chat_template, vocab.chat_template)
        name = hf_dir.resolve().name
        metadata, tensors = plan_gguf(source, vocab, config, outtype, name=name)
        write_gguf(out, gguf_arch(config, hf_dir), metadata, tensors, description=f"{name} → {out.name}")
    finally:
        source.close()
    return out

"""The output tokenizer of a merge and the embedding rows that go with it (mergekit semantics).

mergekit (``mergekit/tokenizer/build.py`` ``build_tokenizer``, ``embed.py`` ``PermutedVocabulary``)
picks the output vocabulary from ``tokenizer_source`` (``base``, ``union`` or ``model:<name>``),
maps every output id to each model's id for the same token STRING (or -1), and re-indexes each
model's ``embed_tokens`` / ``lm_head`` rows through that map before merging them. This module does
the same with plain data: vocabularies in, ``(Vocab, maps)`` out; row tensors in, row tensors out.

Where we differ from mergekit, on purpose:
* Order of new tokens. mergekit adds the tokens the base lacks in Python set order, which changes
  from run to run; we add them in model order, then in each model's id order, so a rebuild gives
  the same ids and the same bytes.
* SentencePiece. mergekit writes only tokenizer.json with the new tokens as HF "added tokens";
  we keep a real SentencePiece model: the base's proto with the new tokens appended as pieces of
  their own type. Base text then tokenizes exactly as with the base when the new pieces are
  control or user-defined tokens (the usual case: models of one family that added chat tokens).
  New NORMAL pieces from a foreign vocabulary can be reached by merges; they get scores below
  every base piece (kept in their order), so the base's merges always win first and such text
  changes only where the base had nothing left to merge.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np
import torch

from ..errors import GGMergeError
from . import spm_proto
from .spm_proto import NORMAL
from .vocab import Vocab

log = logging.getLogger(__name__)


def vocab_from_donor(donor: Vocab, vocabs: Sequence[Vocab],
                     n_rows: Sequence[int | None] | None = None) -> tuple[Vocab, list[np.ndarray]]:
    """mergekit's ``tokenizer_source: base`` or ``model:<name>``: ``donor``'s vocabulary as it is,
    with each model's map by token string (the donor need not be one of ``vocabs``)."""
    vocabs = _truncated(vocabs, n_rows)
    out = dataclasses.replace(donor, tokens=list(donor.tokens), scores=list(donor.scores),
                              types=list(donor.types), merges=list(donor.merges))
    return out, _maps(out, vocabs)


def union_vocab(vocabs: Sequence[Vocab], base: int,
                n_rows: Sequence[int | None] | None = None) -> tuple[Vocab, list[np.ndarray]]:
    """The union of ``vocabs`` by token string, the base's tokens first, and per-model id maps.

    ``n_rows[i]`` is the number of embedding rows model ``i`` really has: its tokens at ids past
    that are ignored, as mergekit ignores ids ``>= vocab_size``. ``maps[i][j]`` is model ``i``'s id
    for merged token ``j``, or -1. Special ids, add_bos/eos, chat template and pre-tokenizer come
    from the base, whose ids are unchanged.
    """
    if not 0 <= base < len(vocabs):
        raise GGMergeError(f"base index {base} out of range for {len(vocabs)} vocabularies")
    vocabs = _truncated(vocabs, n_rows)
    b = vocabs[base]
    kinds = {v.model for v in vocabs}
    if len(kinds) > 1:
        log.warning("union of different tokenizer kinds %s: tokens are matched by string, which "
                    "rarely lines up across kinds", sorted(kinds))
    tokens, scores, types = list(b.tokens), list(b.scores), list(b.types)
    seen = set(tokens)
    origin: list[tuple[int, int]] = []  # (model, id) of each appended token
    for m, v in enumerate(vocabs):
        if m == base:
            continue
        for i, tok in enumerate(v.tokens):
            if tok not in seen:
                seen.add(tok)
                origin.append((m, i))
                tokens.append(tok)
                scores.append(v.scores[i])
                types.append(v.types[i])
    n_base = len(b.tokens)
    log.info("union tokenizer: %d base tokens + %d new = %d", n_base, len(origin), len(tokens))
    out = dataclasses.replace(b, tokens=tokens, scores=scores, types=types, merges=list(b.merges))
    if origin and b.model == "llama":
        _as_sentencepiece(out, b, n_base)
    elif origin and b.model == "gpt2":
        out.merges = _union_merges(b, vocabs, origin)
    return out, _maps(out, vocabs)


def remap_rows(rows_by_model: Sequence[torch.Tensor], maps: Sequence[np.ndarray], base: int | None,
               weights: Sequence[float] | None = None,
               pad_to_multiple_of: int | None = None,
               overrides: dict[int, tuple[bool, int | None, int | None]] | None = None) -> list[torch.Tensor]:
    """Each model's token rows (embed_tokens or lm_head, tokens on dim 0) in the merged vocabulary.

    Row ``j`` of model ``i`` is its own row ``maps[i][j]`` when it has the token. Otherwise it is
    the same fill row for every model that lacks it (mergekit ``assign_embedding_sources``):
    the only model that has the token gives it; else the base gives it if it has it; else the
    mean of the rows of the models that have it (weighted by ``weights`` if given; mergekit's
    mean is unweighted); zero if no model has it. With ``pad_to_multiple_of`` the row count is
    rounded up and the extra rows are each model's mean row (mergekit does the same).

    ``overrides`` (``tokenizer.tokens``): merged id → (force, source model index or None for zeros,
    source row); that row replaces the fill for the models lacking the token, and every model's own
    row too with ``force`` (mergekit ``PermutedVocabulary``), before the padding rows are averaged.
    """
    if len(rows_by_model) != len(maps) or not maps:
        raise GGMergeError(f"{len(rows_by_model)} row tensors for {len(maps)} vocabulary maps")
    n = len(maps[0])
    shape = rows_by_model[0].shape[1:]
    dtype = rows_by_model[0].dtype
    idx = [torch.as_tensor(np.asarray(m, dtype=np.int64)) for m in maps]
    for i, (rows, ix) in enumerate(zip(rows_by_model, idx)):
        if rows.shape[1:] != shape:
            raise GGMergeError(f"token rows of model {i} have shape {tuple(rows.shape)}, "
                               f"model 0 has {tuple(rows_by_model[0].shape)}")
        if len(ix) != n or (n and int(ix.max()) >= rows.shape[0]):
            raise GGMergeError(f"vocabulary map {i} points past the {rows.shape[0]} rows of its "
                               "tensor (pass the row counts to union_vocab)")
        dtype = torch.promote_types(dtype, rows.dtype)
    present = torch.stack([ix >= 0 for ix in idx])  # (models, n)
    lacking = (~present).any(dim=0).nonzero().squeeze(1)
    fill = _fill_rows(rows_by_model, idx, present, lacking, base, weights, dtype)
    slot = torch.full((n,), -1, dtype=torch.int64)
    slot[lacking] = torch.arange(len(lacking))
    n_out = n if not pad_to_multiple_of else -(-n // pad_to_multiple_of) * pad_to_multiple_of
    out = []
    for rows, ix, has in zip(rows_by_model, idx, present):
        new = torch.empty((n_out, *shape), dtype=dtype)
        own = has.nonzero().squeeze(1)
        new[own] = rows[ix[own]].to(dtype)
        missing = (~has).nonzero().squeeze(1)
        new[missing] = fill[slot[missing]]
        for j, (force, m, row) in (overrides or {}).items():
            if force or not bool(has[j]):
                new[j] = 0 if m is None else rows_by_model[m][row].to(dtype)
        if n_out > n:
            new[n:] = new[:n].mean(dim=0)
        out.append(new)
    return out


# ---------------------------------------------------------------------------------- internals

def _fill_rows(rows_by_model, idx, present, lacking, base, weights, dtype) -> torch.Tensor:
    """Fill rows for the ``lacking`` token ids, in that order (mergekit ``PermutedVocabulary``).

    The mean is summed model by model in ``dtype`` and divided by the count, the operations
    mergekit performs, so float32 inputs give mergekit's float32 values.
    """
    shape = rows_by_model[0].shape[1:]
    has = present[:, lacking]  # (models, K)
    count = has.sum(dim=0)
    acc = torch.zeros((len(lacking), *shape), dtype=dtype)
    denom = torch.zeros(len(lacking), dtype=dtype)
    for m, (rows, ix) in enumerate(zip(rows_by_model, idx)):
        k = has[m].nonzero().squeeze(1)
        w = 1.0 if weights is None else float(weights[m])
        contrib = rows[ix[lacking[k]]].to(dtype)
        acc[k] += contrib if weights is None else contrib * w
        denom[k] += w
    view = (-1,) + (1,) * len(shape)
    fill = acc / torch.where(denom == 0, torch.ones_like(denom), denom).reshape(view)
    donors = [(count == 1) & has[m] for m in range(len(idx))]
    if base is not None:
        donors[base] = donors[base] | ((count >= 2) & has[base])
    for m, sel in enumerate(donors):  # a single donor's or the base's row, exactly
        k = sel.nonzero().squeeze(1)
        fill[k] = rows_by_model[m][idx[m][lacking[k]]].to(dtype)
    if int((count == 0).sum()):
        log.warning("%d merged tokens are in no model's vocabulary: zero rows", int((count == 0).sum()))
    return fill


def _truncated(vocabs: Sequence[Vocab], n_rows: Sequence[int | None] | None) -> list[Vocab]:
    if n_rows is None:
        return list(vocabs)
    if len(n_rows) != len(vocabs):
        raise GGMergeError(f"{len(n_rows)} row counts for {len(vocabs)} vocabularies")
    out = []
    for v, n in zip(vocabs, n_rows):
        if n is not None and n < len(v):
            log.warning("ignoring %d tokens past the %d embedding rows (ids >= vocab_size)", len(v) - n, n)
            proto = v.spm_proto and spm_proto.truncate(v.spm_proto, n)
            v = dataclasses.replace(v, tokens=v.tokens[:n], scores=v.scores[:n], types=v.types[:n],
                                    spm_proto=proto)
        out.append(v)
    return out


def _maps(out: Vocab, vocabs: Sequence[Vocab]) -> list[np.ndarray]:
    maps = []
    for v in vocabs:
        index = v.index()
        maps.append(np.fromiter((index.get(t, -1) for t in out.tokens), dtype=np.int64, count=len(out)))
    return maps


def _as_sentencepiece(out: Vocab, b: Vocab, n_base: int) -> None:
    """Give the merged llama vocabulary a tokenizer.model: the base's proto plus the new pieces."""
    byte_fallback = spm_proto.has_byte_fallback(b)
    score = np.float32(min((s for s, t in zip(b.scores, b.types) if t == NORMAL), default=0.0))
    for j in range(n_base, len(out.tokens)):
        # types SentencePiece refuses here (a 2nd unk, bytes without byte fallback) are downgraded
        out.types[j] = spm_proto.appended_type(out.types[j], byte_fallback)
        if out.types[j] == NORMAL:
            # below every base piece, so base merges always win first; one lower per piece, in
            # float32 (what the proto stores), where -1 may round away at large magnitudes
            lower = np.float32(score - np.float32(1.0))
            score = lower if lower < score else np.nextafter(score, np.float32(-np.inf))
            out.scores[j] = float(score)
    if b.spm_proto is None:
        out.spm_proto = None  # the writer builds one from every token (spm_proto.build)
        return
    proto = spm_proto.parse(b.spm_proto)
    n_proto = len(proto.pieces)
    # base tokens past its proto (HF added tokens) become pieces too, so ids stay aligned
    extra = range(n_proto, len(out.tokens))
    out.spm_proto = spm_proto.append(b.spm_proto, [out.tokens[j] for j in extra],
                                     [out.scores[j] for j in extra], [out.types[j] for j in extra])


def _union_merges(b: Vocab, vocabs: Sequence[Vocab], origin: list[tuple[int, int]]) -> list[str]:
    """Base merges, then each donor's merges that produce one of its new tokens (donor rank order)."""
    new_by_model: dict[int, set[str]] = {}
    for m, i in origin:
        new_by_model.setdefault(m, set()).add(vocabs[m].tokens[i])
    merges = list(b.merges)
    have = set(merges)
    seen = set(b.tokens) | {vocabs[m].tokens[i] for m, i in origin}
    for m in sorted(new_by_model):
        new = new_by_model[m]
        for merge in vocabs[m].merges:
            left, _, right = merge.partition(" ")
            if left + right in new and merge not in have and left in seen and right in seen:
                have.add(merge)
                merges.append(merge)
    return merges

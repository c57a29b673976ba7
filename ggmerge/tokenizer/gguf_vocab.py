"""A :class:`~ggmerge.tokenizer.vocab.Vocab` into and out of GGUF ``tokenizer.ggml.*`` metadata.

What llama.cpp's ``llama_vocab::impl::load`` (src/llama-vocab.cpp) reads:

* ``tokenizer.ggml.model`` — ``llama`` (SentencePiece: tokens + scores + types) or ``gpt2``
  (byte-level BPE: tokens + types + merges, and ``tokenizer.ggml.pre`` naming the pre-tokenizer
  regexes); the SentencePiece path writes ``pre = "default"`` as llama.cpp's converter does;
* ``tokenizer.ggml.token_type`` — ``gguf.TokenType`` values; llama.cpp treats CONTROL tokens as
  special (never produced from plain text unless ``parse_special``), USER_DEFINED as literal pieces
  matched before the model, BYTE as ``<0xXX>`` fallbacks, UNUSED as unreachable;
* the special ids (bos/eos/unk/pad), ``add_bos_token``/``add_eos_token`` (and ``add_sep_token`` when
  the tokenizer files say, as gguf-py's ``SpecialVocab`` writes it), ``add_space_prefix`` and
  ``chat_template``.

When the embedding has more rows than the tokenizer has tokens (vocab_size padded to a multiple of
64, say), the extra ids get ``[PAD{id}]`` entries of type UNUSED — the same filler
``_create_vocab_sentencepiece`` / ``get_vocab_base`` in convert_hf_to_gguf.py write, because
llama.cpp sizes the vocabulary from the token list and requires it to match ``token_embd``.
"""
from __future__ import annotations

import logging

import gguf

from ..errors import GGMergeError
from .vocab import Vocab

log = logging.getLogger(__name__)

#: score of padding entries in SentencePiece vocabularies (the converter's initial fill value)
PAD_SCORE = -10000.0
MODELS = ("llama", "gpt2")


def padded(vocab: Vocab, n_rows: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types extended with ``[PAD{id}]`` UNUSED entries up to ``n_rows``."""
    n = len(vocab.tokens)
    if n_rows < n:
        raise GGMergeError(
            f"the tokenizer has {n} tokens but the embedding only {n_rows} rows; llama.cpp needs a row "
            "for every token", key="tokenizer.ggml.tokens")
    scores = list(vocab.scores) if vocab.scores else [0.0] * n
    types = list(vocab.types) if vocab.types else [int(gguf.TokenType.NORMAL)] * n
    if len(scores) != n or len(types) != n:
        raise GGMergeError(f"vocabulary lists disagree: {n} tokens, {len(scores)} scores, {len(types)} types",
                           key="tokenizer.ggml.tokens")
    extra = range(n, n_rows)
    return (
        list(vocab.tokens) + [f"[PAD{i}]" for i in extra],
        [float(s) for s in scores] + [PAD_SCORE] * len(extra),
        [int(t) for t in types] + [int(gguf.TokenType.UNUSED)] * len(extra),
    )


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab, n_rows: int) -> None:
    """Add ``vocab`` as ``tokenizer.ggml.*`` KVs, padded to ``n_rows`` (the embedding's row count)."""
    if vocab.model not in MODELS:
        raise GGMergeError(f"tokenizer model '{vocab.model}' cannot be written (expected one of {MODELS})",
                           key="tokenizer.ggml.model")
    tokens, scores, types = padded(vocab, n_rows)
    if n_rows > len(vocab.tokens):
        log.info("padding the vocabulary with %d [PAD] entries to the %d embedding rows",
                 n_rows - len(vocab.tokens), n_rows)
    for what, tid in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("unk", vocab.unk_id), ("pad", vocab.pad_id)):
        if tid is not None and not 0 <= tid < n_rows:
            raise GGMergeError(f"{what} token id {tid} is outside the vocabulary (0..{n_rows - 1})",
                               key=f"tokenizer.ggml.{what}_token_id")

    writer.add_tokenizer_model(vocab.model)
    if vocab.model == "llama":
        writer.add_tokenizer_pre(vocab.pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    else:
        if not vocab.merges:
            raise GGMergeError("a gpt2 (BPE) vocabulary needs merges", key="tokenizer.ggml.merges")
        writer.add_tokenizer_pre(vocab.pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(list(vocab.merges))
    if vocab.bos_id is not None:
        writer.add_bos_token_id(int(vocab.bos_id))
    if vocab.eos_id is not None:
        writer.add_eos_token_id(int(vocab.eos_id))
    if vocab.unk_id is not None:
        writer.add_unk_token_id(int(vocab.unk_id))
    if vocab.pad_id is not None:
        writer.add_pad_token_id(int(vocab.pad_id))
    writer.add_add_bos_token(bool(vocab.add_bos))
    writer.add_add_eos_token(bool(vocab.add_eos))
    if vocab.add_sep is not None:
        writer.add_add_sep_token(bool(vocab.add_sep))
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(bool(vocab.add_space_prefix))
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _get(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def read_gguf(reader: gguf.GGUFReader) -> Vocab:
    """The vocabulary stored in a GGUF's metadata (padding entries included, as stored)."""
    model = _get(reader, "tokenizer.ggml.model")
    if model not in MODELS:
        raise GGMergeError(f"tokenizer model '{model}' is not supported (expected one of {MODELS})",
                           key="tokenizer.ggml.model")
    tokens = _get(reader, "tokenizer.ggml.tokens")
    if not tokens or not isinstance(tokens, list):
        raise GGMergeError("GGUF has no token list", key="tokenizer.ggml.tokens")
    n = len(tokens)
    scores = _get(reader, "tokenizer.ggml.scores") or [0.0] * n
    types = _get(reader, "tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * n
    # a damaged or hostile file may store any type under these keys
    for key, values, kind in (("tokens", tokens, str), ("scores", scores, (int, float)),
                              ("token_type", types, int)):
        if not isinstance(values, list):
            raise GGMergeError(f"must be an array, got {type(values).__name__}", key=f"tokenizer.ggml.{key}")
        bad = next((v for v in values if not isinstance(v, kind) or isinstance(v, bool)), None)
        if bad is not None:
            raise GGMergeError(f"holds {bad!r}, not the expected type", key=f"tokenizer.ggml.{key}")
    if len(scores) != n or len(types) != n:
        raise GGMergeError(f"vocabulary lists disagree: {n} tokens, {len(scores)} scores, {len(types)} types",
                           key="tokenizer.ggml.tokens")

    def tid(name: str):
        v = _get(reader, f"tokenizer.ggml.{name}_token_id")
        return None if v is None else int(v)

    # llama.cpp's defaults when the flags are absent (llama_vocab::impl::load): SentencePiece adds
    # BOS; BPE adds it only for the llama3 family of pre-tokenizers
    pre = _get(reader, "tokenizer.ggml.pre")
    add_bos = _get(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = model == "llama" or pre in ("llama3", "llama-v3", "llama-bpe")
    add_eos = _get(reader, "tokenizer.ggml.add_eos_token")
    add_sep = _get(reader, "tokenizer.ggml.add_sep_token")
    space = _get(reader, "tokenizer.ggml.add_space_prefix")
    return Vocab(
        model=model,
        tokens=list(tokens),
        scores=[float(s) for s in scores],
        types=[int(t) for t in types],
        merges=list(_get(reader, "tokenizer.ggml.merges") or []),
        pre=pre,
        bos_id=tid("bos"),
        eos_id=tid("eos"),
        unk_id=tid("unknown") if tid("unknown") is not None else tid("unk"),
        pad_id=tid("padding") if tid("padding") is not None else tid("pad"),
        add_bos=bool(add_bos),
        add_eos=False if add_eos is None else bool(add_eos),
        add_sep=None if add_sep is None else bool(add_sep),
        add_space_prefix=None if space is None else bool(space),
        chat_template=_get(reader, "tokenizer.chat_template"),
    )

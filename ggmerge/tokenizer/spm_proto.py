"""SentencePiece ``tokenizer.model`` files: parse, validate, extend, and build one from a Vocab.

A SentencePiece model is a serialized ``ModelProto`` (protobuf): the pieces (string, score, type)
plus the trainer and normalizer settings that decide how text is split. We keep a real file's proto
whole wherever we can, because those settings (byte fallback, dummy ``▁`` prefix, NFKC tables) are
what make llama.cpp, ``sentencepiece`` and transformers tokenize alike; only the piece list changes.

Piece types in the proto and ``gguf.TokenType`` share one numbering (NORMAL=1, UNKNOWN=2,
CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6), so types pass through unchanged.
"""
from __future__ import annotations

import os
from typing import Sequence

from ..errors import GGMergeError
from .vocab import Vocab

# literal values (a test checks them against gguf.TokenType): importing gguf-py here would load it, and
# the tokenizer libraries it imports, into every build whether or not a GGUF is involved
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _pb():
    # sentencepiece ships the generated protobuf module; importing it needs `protobuf`
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def parse(data: bytes, *, path: str | os.PathLike | None = None):
    """Serialized ModelProto → message; anything sentencepiece would refuse → GGMergeError(path)."""
    from google.protobuf.message import DecodeError

    proto = _pb().ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise GGMergeError(f"not a SentencePiece model (protobuf: {exc})", path=path) from None
    if not proto.pieces:
        raise GGMergeError("not a SentencePiece model (no pieces)", path=path)
    validate(data, path=path)
    return proto


def validate(data: bytes, *, path: str | os.PathLike | None = None) -> None:
    """Load the proto with sentencepiece itself: the one authority on what it accepts."""
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as exc:
        raise GGMergeError(f"SentencePiece refuses this model: {str(exc).strip()}", path=path) from None


def pieces(proto) -> tuple[list[str], list[float], list[int]]:
    """The (tokens, scores, types) lists of a parsed proto, types as gguf.TokenType ints."""
    return ([p.piece for p in proto.pieces], [float(p.score) for p in proto.pieces],
            [int(p.type) for p in proto.pieces])


def append(data: bytes, tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
           *, path: str | os.PathLike | None = None) -> bytes:
    """A copy of the proto ``data`` with pieces appended after its own (ids continue from there).

    Types SentencePiece forbids in this model are downgraded so the result still loads, never
    dropped (the id must keep its row): a second UNKNOWN becomes CONTROL; BYTE pieces in a model
    without byte fallback become UNUSED. Both are pieces the encoder never emits from text.
    """
    proto = parse(data, path=path)
    byte_fallback = proto.trainer_spec.byte_fallback
    for tok, score, typ in zip(tokens, scores, types, strict=True):
        p = proto.pieces.add()
        p.piece, p.score, p.type = tok, float(score), appended_type(typ, byte_fallback)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    out = proto.SerializeToString()
    validate(out, path=path)
    return out


def truncate(data: bytes, n: int) -> bytes:
    """The proto with only its first ``n`` pieces (a model whose embedding has fewer rows)."""
    proto = parse(data)
    if n >= len(proto.pieces):
        return data
    del proto.pieces[n:]
    proto.trainer_spec.vocab_size = n
    out = proto.SerializeToString()
    validate(out)
    return out


def appended_type(typ: int, byte_fallback: bool) -> int:
    """The type a piece appended to a model can keep (see :func:`append`)."""
    typ = int(typ)
    if typ == UNKNOWN:
        return CONTROL
    if typ == BYTE and not byte_fallback:
        return UNUSED
    return typ


def has_byte_fallback(vocab: Vocab) -> bool:
    """Byte fallback of the model ``vocab`` will be written as: the kept proto's, else all 256 bytes present."""
    if vocab.spm_proto is not None:
        return bool(parse(vocab.spm_proto).trainer_spec.byte_fallback)
    have = set(vocab.tokens)
    return all(f"<0x{b:02X}>" in have for b in range(256))


def matches(proto, vocab: Vocab) -> bool:
    """True if ``proto``'s pieces are the first tokens of ``vocab`` (same strings, in order).

    Scores and types may differ where HF added-token entries override them (see hf_vocab); the
    writer records those overrides in tokenizer_config.json instead of in the proto.
    """
    n = len(proto.pieces)
    return n <= len(vocab.tokens) and all(p.piece == t for p, t in zip(proto.pieces, vocab.tokens))


def build(vocab: Vocab) -> bytes:
    """A SentencePiece ModelProto holding every token of ``vocab`` as a piece.

    Trainer/normalizer settings come from ``vocab.spm_proto`` when there is one; otherwise they are
    what Mistral's and Llama's ``tokenizer.model`` hold (mistral-common ``tokenizer.model.v1``):
    BPE model, byte fallback when the 256 ``<0xXX>`` pieces are present, ``identity`` normalizer
    (no NFKC), dummy ``▁`` prefix, extra whitespace kept, digits split. That is also what
    llama.cpp's ``llama`` tokenizer implements (score-ranked merges, byte fallback), so a vocabulary
    read back from a GGUF tokenizes the same in sentencepiece as in llama.cpp.
    """
    pb = _pb()
    proto = pb.ModelProto()
    if vocab.spm_proto is not None:
        proto.ParseFromString(vocab.spm_proto)
        del proto.pieces[:]
    else:
        _default_specs(proto, vocab)
    seen: set[str] = set()
    unk = vocab.unk_id
    for i, (tok, score, typ) in enumerate(zip(vocab.tokens, vocab.scores, vocab.types, strict=True)):
        if tok in seen:
            raise GGMergeError(f"token {tok!r} (id {i}) appears twice; a SentencePiece model "
                               "needs unique pieces", key="tokenizer.ggml.tokens")
        seen.add(tok)
        typ = int(typ)
        # exactly one UNKNOWN piece, at the unk id (HF configs may have re-typed it as CONTROL)
        if unk is not None:
            typ = UNKNOWN if i == unk else (CONTROL if typ == UNKNOWN else typ)
        if typ == BYTE and not proto.trainer_spec.byte_fallback:
            typ = UNUSED
        p = proto.pieces.add()
        p.piece, p.score, p.type = tok, float(score), typ
    ts = proto.trainer_spec
    ts.vocab_size = len(proto.pieces)
    used: set[int] = set()
    for name in ("unk", "bos", "eos", "pad"):
        tid = getattr(vocab, f"{name}_id")
        # sentencepiece wants four distinct ids (or -1); HF often reuses eos or unk as pad
        if tid is None or not 0 <= tid < len(vocab.tokens) or tid in used:
            setattr(ts, f"{name}_id", -1)
            continue
        used.add(tid)
        setattr(ts, f"{name}_id", tid)
        setattr(ts, f"{name}_piece", vocab.tokens[tid])
    out = proto.SerializeToString()
    validate(out)
    return out


def _default_specs(proto, vocab: Vocab) -> None:
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    ts.model_type = _pb().TrainerSpec.BPE
    ts.byte_fallback = has_byte_fallback(vocab)
    ts.split_digits = True
    ts.split_by_unicode_script = True
    ts.split_by_whitespace = True
    ts.split_by_number = True
    ts.allow_whitespace_only_pieces = True
    ts.max_sentencepiece_length = 16
    ts.treat_whitespace_as_suffix = False
    ts.unk_surface = " \u2047 "
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = True if vocab.add_space_prefix is None else bool(vocab.add_space_prefix)
    ns.remove_extra_whitespaces = False
    ns.normalization_rule_tsv = ""  # escape_whitespaces stays at its default (true), as in v1

"""Calibration text → token chunks, exactly as llama-perplexity and llama-imatrix cut them.

Both tools (``perplexity()`` / ``kl_divergence()`` in tools/perplexity/perplexity.cpp, ``compute_imatrix``
in tools/imatrix/imatrix.cpp) tokenize the whole file once with ``common_tokenize(ctx, text,
add_special=true, parse_special=false)`` — one BOS at the very start if the vocabulary adds one — and cut
the tokens into ``n_chunk = min(--chunks, n_tokens // n_ctx)`` consecutive windows of ``n_ctx`` tokens (the
tail is dropped; fewer than ``2·n_ctx`` tokens is an error). In each window the first token is
*overwritten* by BOS (not inserted) when the vocabulary adds BOS. Perplexity and KL divergence score the
second half: the logits at positions ``n_ctx/2 … n_ctx-2`` predicting tokens ``n_ctx/2+1 … n_ctx-1``.

Tokenization uses llama.cpp's own tokenizer (vocabulary only, through llama-cpp-python) when a GGUF is at
hand, so the ids are the tools' ids; an HF folder alone is tokenized by transformers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GGMergeError

log = logging.getLogger(__name__)


@dataclass
class Chunks:
    """``tokens``: int64 [n_chunk, ctx] with BOS already written into column 0 where the vocab adds BOS."""

    tokens: np.ndarray
    n_text_tokens: int
    add_bos: bool
    bos: int | None

    @property
    def ctx(self) -> int:
        return self.tokens.shape[1]

    @property
    def first(self) -> int:
        """First scored logit position (perplexity.cpp: ``first = n_ctx/2``)."""
        return self.ctx // 2

    def scored(self) -> slice:
        """Logit rows that are scored: ``first … ctx-2`` (each predicts the next token)."""
        return slice(self.first, self.ctx - 1)

    def targets(self, i: int) -> np.ndarray:
        """The tokens the scored rows of chunk ``i`` predict (the text's own tokens, never the BOS)."""
        return self.tokens[i, self.first + 1:]


def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise GGMergeError("no such text file", path=p) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GGMergeError(f"is not UTF-8 text (byte {exc.start})", path=p) from None


def tokenize_llamacpp(gguf: Path, text: str) -> tuple[list[int], bool, int | None, int]:
    """(ids, add_bos, bos id, n_vocab) from llama.cpp's tokenizer for ``gguf`` (vocabulary only)."""
    from .llamacpp import load, module

    llm = load(gguf, n_ctx=512, vocab_only=True)
    try:
        C = module().llama_cpp
        vocab = C.llama_model_get_vocab(llm.model)
        add_bos = bool(C.llama_vocab_get_add_bos(vocab))
        if C.llama_vocab_get_add_eos(vocab):
            # perplexity.cpp asserts the same: an appended EOS would be scored as text
            raise GGMergeError("the vocabulary appends EOS to every text; perplexity is undefined", path=gguf)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        return list(ids), add_bos, int(llm.token_bos()), int(llm.n_vocab())
    finally:
        llm.close()


def tokenize_hf(tokenizer_dir: Path, text: str) -> tuple[list[int], bool, int | None, int]:
    """(ids, add_bos, bos id, vocab size) from transformers' tokenizer (special tokens added, none parsed
    from the text: ``split_special_tokens`` like llama.cpp's ``parse_special=false``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    bos = tok.bos_token_id
    probe = tok("a", add_special_tokens=True)["input_ids"]
    add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    try:
        ids = tok(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    except TypeError:
        ids = tok(text, add_special_tokens=True)["input_ids"]
    return list(ids), add_bos, bos, len(tok)


def make_chunks(ids: list[int], *, ctx: int, chunks: int | None, add_bos: bool, bos: int | None,
                where: Path | None = None) -> Chunks:
    """Cut ``ids`` into windows as perplexity.cpp's ``perplexity()`` does (see the module docstring)."""
    if ctx < 4 or ctx % 2:
        raise GGMergeError(f"--ctx must be an even number ≥ 4 (got {ctx})", path=where)
    if len(ids) < 2 * ctx:
        raise GGMergeError(f"tokenizes to {len(ids)} tokens; a context of {ctx} needs at least {2 * ctx}",
                           path=where)
    n_max = len(ids) // ctx
    n = n_max if chunks is None or chunks < 0 else min(chunks, n_max)
    if n < 1:
        raise GGMergeError("--chunks must be at least 1", path=where)
    toks = np.asarray(ids[: n * ctx], dtype=np.int64).reshape(n, ctx).copy()
    if add_bos:
        if bos is None:
            raise GGMergeError("the vocabulary adds BOS but has no BOS token", path=where)
        toks[:, 0] = bos
    return Chunks(tokens=toks, n_text_tokens=len(ids), add_bos=add_bos, bos=bos)


def chunks_for(source, text_file: str | Path, *, ctx: int, chunks: int | None,
               tokenizer_gguf: Path | None = None) -> Chunks:
    """Tokenize ``text_file`` with llama.cpp (``tokenizer_gguf``, or ``source``'s file if it is a GGUF) or
    else with ``source``'s HF tokenizer, and cut it into chunks."""
    text = read_text(text_file)
    if tokenizer_gguf is None and source is not None and Path(source.path).suffix.lower() == ".gguf":
        tokenizer_gguf = Path(source.path)
    if tokenizer_gguf is not None:
        ids, add_bos, bos, _ = tokenize_llamacpp(tokenizer_gguf, text)
    else:
        tdir = source.tokenizer_dir()
        if tdir is None:
            raise GGMergeError("has no tokenizer files to tokenize the text with", path=source.path)
        ids, add_bos, bos, _ = tokenize_hf(tdir, text)
    c = make_chunks(ids, ctx=ctx, chunks=chunks, add_bos=add_bos, bos=bos, where=Path(text_file))
    log.info("%s: %d tokens → %d chunks of %d", text_file, len(ids), c.tokens.shape[0], ctx)
    return c

"""Perplexity and KL divergence over a text, chunked like ``llama-perplexity --kl-divergence``.

``kl_divergence()`` in tools/perplexity/perplexity.cpp scores, in every ``n_ctx`` window of the text
(:mod:`ggmerge.calibration`), the logits at positions ``n_ctx/2 … n_ctx-2``; per scored token it adds the
quantized model's negative log-likelihood of the next token, the reference's, KL(reference ‖ quantized)
over the whole vocabulary, and whether both rank the same token first. Differences from the tool, on
purpose: the reference's log-probabilities are kept as float32 (llama-perplexity stores them as 16-bit
steps of (max−min)/65535 over a 16-nat range, and ignores tokens below e⁻¹⁶) and the sums are float64 over
exact float64 softmaxes, so the figures are the exact ones that the tool approximates.

The reference runs once, through the layer-wise forward pass (:mod:`ggmerge.forward`, any HF folder or
GGUF, one layer in memory) or through llama.cpp (a GGUF, as llama-perplexity runs it). Its scored
log-probabilities go to a scratch file (one record per chunk, read back with positional reads, so they
stay out of memory); each GGUF is then run chunk by chunk in llama.cpp and compared.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .calibration import Chunks
from .errors import GGMergeError

#: rows of [rows, vocab] float64 work arrays at once (bounds memory for large vocabularies)
_ROW_BLOCK = 32


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    x -= m
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


class RefLogProbs:
    """The reference's float32 log-probabilities of every chunk's scored rows, in a scratch file."""

    def __init__(self, chunks: Chunks, scratch_dir: str | None = None):
        self.rows = chunks.ctx - 1 - chunks.first
        self.vocab: int | None = None
        self._fd, self._path = tempfile.mkstemp(prefix="ggmerge-ref-", suffix=".f32", dir=scratch_dir)
        os.unlink(self._path)  # nothing left behind, whatever happens
        n = chunks.tokens.shape[0]
        self.nll = np.zeros((n, self.rows), dtype=np.float64)
        self.top = np.zeros((n, self.rows), dtype=np.int64)
        self._chunks = chunks

    def put(self, i: int, logits: np.ndarray) -> None:
        """Chunk ``i``'s logits for its scored rows ([rows, vocab])."""
        if logits.shape[0] != self.rows:
            raise AssertionError((logits.shape, self.rows))
        if self.vocab is None:
            self.vocab = logits.shape[1]
        lp = np.empty(logits.shape, dtype=np.float32)
        tgt = self._chunks.targets(i)
        for r0 in range(0, self.rows, _ROW_BLOCK):
            b = log_softmax(logits[r0:r0 + _ROW_BLOCK])
            lp[r0:r0 + _ROW_BLOCK] = b
            rows = np.arange(b.shape[0])
            self.nll[i, r0:r0 + b.shape[0]] = -b[rows, tgt[r0:r0 + b.shape[0]]]
        self.top[i] = logits.argmax(axis=-1)
        os.pwrite(self._fd, lp.tobytes(), i * self.rows * self.vocab * 4)

    def get(self, i: int) -> np.ndarray:
        n = self.rows * self.vocab * 4
        buf = os.pread(self._fd, n, i * n)
        return np.frombuffer(buf, dtype=np.float32).reshape(self.rows, self.vocab)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class Scores:
    """Per scored token: KL(ref ‖ model), the model's NLL, top-1 agreement, and KL as llama-perplexity
    estimates it (:func:`llama_kld`); chunk-major."""

    kld: np.ndarray
    nll: np.ndarray
    same_top: np.ndarray
    kld_llama: np.ndarray | None = None


def llama_kld(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """KL divergence per row as llama-perplexity computes it, from exact float64 log-probabilities.

    perplexity.cpp's ``log_softmax(..., uint16_t * log_prob, ...)`` stores the base's log-probabilities as
    ``nearest_int((lp − min)/scale)`` steps with ``min = max(min lp, max lp − 16)`` and
    ``scale = (max lp − min)/65535`` (anything at or below ``min`` stored as 0), and the KL loop of the
    ``kl_divergence`` variant adds only tokens whose stored log-prob is above −16. Dropping that tail and the
    rounding bias the estimate by a few per cent on real models (BENCHMARKS.md); this reproduces it so the
    figures can be compared with published llama-perplexity numbers.
    """
    mx = lp.max(axis=-1, keepdims=True)
    mn = np.maximum(lp.min(axis=-1, keepdims=True), mx - 16)
    scale = ((mx - mn) / 65535).astype(np.float32).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(lp > mn, np.rint((lp - mn) / np.where(scale > 0, scale, 1)), 0)
    lpq = scale * q + mn
    keep = lpq > -16
    return np.where(keep, np.exp(lpq) * (lpq - lq), 0.0).sum(axis=-1)


def score_chunk(ref: RefLogProbs, i: int, logits: np.ndarray, targets: np.ndarray) -> tuple:
    """KLD, NLL and top-1 agreement of one chunk's scored rows (``logits`` [rows, vocab])."""
    lp_all = ref.get(i)
    v = min(lp_all.shape[1], logits.shape[1])
    if lp_all.shape[1] != logits.shape[1]:
        # padded HF embedding rows vs llama.cpp's vocabulary: compare over the common ids
        lp_all = lp_all[:, :v]
        logits = logits[:, :v]
    kld = np.empty(ref.rows)
    kll = np.empty(ref.rows)
    nll = np.empty(ref.rows)
    for r0 in range(0, ref.rows, _ROW_BLOCK):
        lq = log_softmax(logits[r0:r0 + _ROW_BLOCK])
        lp = lp_all[r0:r0 + _ROW_BLOCK].astype(np.float64)
        kld[r0:r0 + lq.shape[0]] = (np.exp(lp) * (lp - lq)).sum(axis=-1)
        kll[r0:r0 + lq.shape[0]] = llama_kld(lp, lq)
        nll[r0:r0 + lq.shape[0]] = -lq[np.arange(lq.shape[0]), targets[r0:r0 + lq.shape[0]]]
    same = logits.argmax(axis=-1) == ref.top[i]
    return kld, nll, same, kll


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """perplexity.cpp's ``mean_and_uncertainty``: mean and its standard error."""
    n = values.size
    if n < 1:
        return 0.0, 0.0
    f = float(values.mean())
    df = float((values * values).mean() - f * f)
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def summary(s: Scores, ref_nll: np.ndarray) -> dict:
    """The figures llama-perplexity prints (ppl ± err, Δppl, KLD mean ± err, median, p99, max, same top)."""
    kld, nll, base = s.kld.reshape(-1), s.nll.reshape(-1), ref_nll.reshape(-1)
    lnp, lnp_err = mean_and_uncertainty(nll)
    lnb, lnb_err = mean_and_uncertainty(base)
    k, k_err = mean_and_uncertainty(kld)
    top = float(s.same_top.mean())
    srt = np.sort(kld)
    return dict(
        tokens=int(kld.size), ppl=math.exp(lnp), ppl_err=math.exp(lnp) * lnp_err,
        ref_ppl=math.exp(lnb), ref_ppl_err=math.exp(lnb) * lnb_err,
        delta_ppl=math.exp(lnp) - math.exp(lnb), ln_ppl_ratio=lnp - lnb,
        kld_mean=k, kld_err=k_err, kld_median=float(np.median(srt)),
        kld_p99=float(np.percentile(srt, 99.0)), kld_max=float(srt[-1]),
        top1_agreement=top, top1_err=math.sqrt(top * (1 - top) / max(kld.size - 1, 1)),
        kld_mean_llama=float(s.kld_llama.mean()) if s.kld_llama is not None else None,
    )


def ref_with_forward_pass(source, chunks: Chunks, ref: RefLogProbs,
                          advance: Callable[[int], None] = lambda k: None) -> None:
    """Fill ``ref`` from ``source`` through :class:`~ggmerge.forward.LayerwiseModel`."""
    import torch

    from .forward import LayerwiseModel

    lm = LayerwiseModel(source, progress=lambda what, k: advance(k))
    lm.run(torch.from_numpy(chunks.tokens), head_rows=chunks.scored(),
           on_logits=lambda i, logits: ref.put(i, logits.numpy()))


def file_type_name(value) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(int(value)).name.replace("MOSTLY_", "")
    except (TypeError, ValueError):
        return "?" if value is None else str(value)


def llamacpp_chunk_logits(path: Path, chunks: Chunks, info: dict | None = None, **load_kw):
    """Yield (i, scored logits) of every chunk, each window evaluated alone from an empty cache, as
    llama-perplexity does (it batches several windows as separate sequences: the same computation).
    ``info`` receives the file's ``file_type`` (from llama.cpp's metadata: no second parse of the file)."""
    from .llamacpp import load

    llm = load(path, n_ctx=chunks.ctx, logits_all=True, n_batch=chunks.ctx, **load_kw)
    try:
        if info is not None:
            info["file_type"] = file_type_name(llm.metadata.get("general.file_type"))
        if llm.n_vocab() <= 0:
            raise GGMergeError("has no vocabulary", path=path)
        sc = chunks.scored()
        for i in range(chunks.tokens.shape[0]):
            llm.reset()
            llm.eval(chunks.tokens[i].tolist())
            yield i, np.array(llm.scores[sc], dtype=np.float32)
    finally:
        llm.close()

"""``ggmerge imatrix``: llama.cpp's importance matrix, computed with the layer-wise forward pass.

What is counted mirrors ``IMatrixCollector::collect_imatrix`` and ``compute_imatrix`` in
tools/imatrix/imatrix.cpp:

- every token of every chunk is run (the whole ``n_ctx`` window, not only the scored half), with the
  window's first token overwritten by BOS when the vocabulary adds BOS (:mod:`ggmerge.calibration`);
- for every matrix multiplication whose weight is a ``blk.*`` tensor, per input column the sum of the
  squared activations entering it, and one count per weight: the number of activation rows summed
  (so ``n_chunk · n_ctx`` for a dense model);
- ``output.weight`` (the LM head) only with ``process_output`` (llama-imatrix's ``--process-output``; off
  by default). A head tied to the embedding is the matmul with ``token_embd.weight`` in llama.cpp, which
  is neither ``blk.*`` nor ``output.weight``, so it is never collected;
- ``chunk_count`` is the number of chunks and ``chunk_size`` is ``n_ctx``.

Each chunk's rows are summed in float32 and the chunks accumulated in float64 (llama.cpp adds float32 in
row order); the file stores float32.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import GGMergeError

log = logging.getLogger(__name__)


class Collector:
    """Sum of x² per input column and row counts, per GGUF weight name (the ``linear_hook`` of
    :class:`~ggmerge.forward.LayerwiseModel`)."""

    def __init__(self, hf_to_gguf, *, process_output: bool = False, tied_head: bool = False):
        self._map = hf_to_gguf
        self._names: dict[str, str | None] = {}
        self.process_output = process_output and not tied_head
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.unknown: set[str] = set()

    def _gguf_name(self, hf_name: str) -> str | None:
        if hf_name not in self._names:
            g = self._map(hf_name)
            if g is None:
                self.unknown.add(hf_name)
            elif not (g.startswith("blk.") or (self.process_output and g == "output.weight")):
                g = None
            self._names[hf_name] = g
        return self._names[hf_name]

    def __call__(self, hf_name: str, x: torch.Tensor) -> None:
        g = self._gguf_name(hf_name)
        if g is None:
            return
        x2 = x.reshape(-1, x.shape[-1])
        # one call's rows (a chunk) summed in float32, calls accumulated in float64
        s = (x2 * x2).sum(dim=0).to(torch.float64)
        if not torch.isfinite(s).all():
            raise GGMergeError("non-finite activations", tensor=g)
        if g in self.sums:
            self.sums[g] += s
            self.counts[g] += x2.shape[0]
        else:
            self.sums[g] = s
            self.counts[g] = x2.shape[0]

    def entries(self) -> dict[str, tuple[np.ndarray, int]]:
        return {g: (s.numpy().astype(np.float32), self.counts[g]) for g, s in self.sums.items()}


def collect(model, chunks, *, process_output: bool = False, max_activation_bytes: int | None = None,
            progress=None) -> Collector:
    """Run ``chunks`` (:class:`~ggmerge.calibration.Chunks`) through ``model`` (a TensorSource) and
    return the filled :class:`Collector`."""
    from ..arch import family_for
    from ..forward import DEFAULT_ACTIVATION_BYTES, LayerwiseModel

    cfg = model.config()
    fam = family_for(cfg, model.path)
    lm = LayerwiseModel(model, max_activation_bytes=max_activation_bytes or DEFAULT_ACTIVATION_BYTES,
                        progress=progress)
    tied = f"{lm.head_name}.weight" not in set(model.names())
    col = Collector(fam.hf_to_gguf, process_output=process_output, tied_head=tied)
    lm.linear_hook = col
    tokens = torch.from_numpy(chunks.tokens)
    if col.process_output:
        lm.run(tokens, head_rows=None, on_logits=lambda i, logits: None)
    else:
        lm.run(tokens)
    if col.unknown:
        log.warning("no GGUF name for %d matmul weight(s), not collected: %s", len(col.unknown),
                    ", ".join(sorted(col.unknown)[:4]))
    return col


def imatrix(model: str, *, text_file: str, ctx: int = 512, chunks: int | None = None,
            output: str | None = None, process_output: bool = False, force: bool = False,
            max_activation_bytes: int | None = None) -> Path:
    """Compute the importance matrix of ``model`` (HF folder, safetensors, GGUF or Hub id) over
    ``text_file`` and write it in llama.cpp's imatrix GGUF format (``-o``, default ``imatrix.gguf``)."""
    from ..calibration import chunks_for
    from ..progress import steps
    from ..sources import open_source
    from . import files

    out = Path(output or "imatrix.gguf")
    if out.exists() and not force:
        raise GGMergeError("already exists (use --force to overwrite)", path=out)
    src = open_source(model)
    ch = chunks_for(src, text_file, ctx=ctx, chunks=chunks)
    n = ch.tokens.shape[0]
    t0 = time.perf_counter()
    cfg = src.config()
    total = n * (int(cfg.get("num_hidden_layers", 1)) + 1 + int(process_output))
    with steps(f"imatrix over {n} chunks of {ctx}", total) as bar:
        col = collect(src, ch, process_output=process_output, max_activation_bytes=max_activation_bytes,
                      progress=lambda what, k: bar.advance(k, what))
    entries = col.entries()
    if not entries:
        raise GGMergeError("no matmul inputs were collected", path=Path(model))
    path = files.write_imatrix(out, entries, datasets=[str(text_file)], chunk_count=n, chunk_size=ctx)
    log.info("%s: %d tensors from %d chunks × %d tokens in %.1f s", path, len(entries), n, ctx,
             time.perf_counter() - t0)
    return path

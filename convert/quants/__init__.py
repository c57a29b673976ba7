"""Quantizers that write exactly the bytes ggml writes.

    from ggmerge.convert.quants import quantize, dequantize, block_info, can_quantize
    raw = quantize(w, GGMLQuantizationType.Q4_K)     # uint8 (..., n_per_row // 256 * 144)
    w2 = dequantize(raw, GGMLQuantizationType.Q4_K)  # float32 (..., n_per_row)

``quantize`` reproduces ``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix=NULL)``
byte for byte, i.e. what llama-quantize writes without ``--imatrix``. Feed it the values llama.cpp
would see: a 16-bit source is converted to float32 first, so quantize bf16/f16-rounded values to
match a llama-quantize run on a bf16/f16 GGUF.

The per-type codecs live in :mod:`.legacy`, :mod:`.kquants` and :mod:`.kquants_low`; the table in
:mod:`.types`. Work is cut into chunks of blocks (bounded temporaries, whatever the tensor size) and
the chunks run on a few threads: numpy releases the GIL inside its loops.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as _gguf_quants

from ggmerge.errors import GGMergeError

from .types import TABLE, QuantType

__all__ = ["quantize", "dequantize", "block_info", "can_quantize", "default_threads"]

_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


def block_info(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) of ``qtype``."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]


def can_quantize(qtype: GGMLQuantizationType) -> bool:
    """True if :func:`quantize` can write ``qtype``."""
    try:
        return GGMLQuantizationType(qtype) in TABLE
    except ValueError:
        return False


def default_threads() -> int:
    """Threads used by :func:`quantize` unless told otherwise: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def quantize(data: np.ndarray, qtype: GGMLQuantizationType, *, threads: int | None = None,
             tensor: str | None = None) -> np.ndarray:
    """Quantize float32 rows ``(..., n_per_row)`` to ``qtype``, exactly as ggml does.

    Returns uint8 ``(..., n_per_row // block_size * type_size)``. ``threads`` defaults to
    :func:`default_threads`; the bytes do not depend on it. ``tensor`` only names the tensor in errors.
    """
    entry = _entry(qtype, tensor)
    x = np.asarray(data)
    if x.ndim == 0:
        raise GGMergeError("cannot quantize a scalar", tensor=tensor)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    x = np.ascontiguousarray(x)
    bs, ts = entry.block_size, entry.type_size
    n_per_row = x.shape[-1]
    if n_per_row % bs:
        raise GGMergeError(
            f"rows of {n_per_row} values cannot be stored as {entry.qtype.name}: "
            f"the row length must be a multiple of its block size {bs}", tensor=tensor)
    blocks = x.reshape(-1, bs)
    out = np.empty((blocks.shape[0], ts), dtype=np.uint8)
    starts = range(0, blocks.shape[0], entry.chunk_blocks)
    check = entry.qtype not in _FLOAT_TYPES

    def run(start: int) -> None:
        chunk = blocks[start:start + entry.chunk_blocks]
        if check and not np.isfinite(chunk).all():
            raise GGMergeError(f"cannot quantize NaN or infinite values to {entry.qtype.name}",
                               tensor=tensor)
        out[start:start + chunk.shape[0]] = entry.codec(chunk)

    n_threads = min(threads or default_threads(), len(starts))
    if n_threads <= 1:
        for s in starts:
            run(s)
    else:
        with ThreadPoolExecutor(n_threads, thread_name_prefix="ggmerge-quant") as pool:
            for f in [pool.submit(run, s) for s in starts]:
                f.result()
    return out.reshape(x.shape[:-1] + (n_per_row // bs * ts,))


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values of ``raw`` (uint8 ``(..., bytes_per_row)``), by gguf-py's codecs."""
    return np.asarray(_gguf_quants.dequantize(np.asarray(raw), GGMLQuantizationType(qtype)),
                      dtype=np.float32)


def _entry(qtype, tensor) -> QuantType:
    try:
        q = GGMLQuantizationType(qtype)
    except ValueError:
        raise GGMergeError(f"unknown GGML type {qtype!r}", tensor=tensor) from None
    if q not in TABLE:
        names = ", ".join(t.name for t in TABLE)
        raise GGMergeError(f"no quantizer for {q.name} (available: {names})", tensor=tensor)
    return TABLE[q]

"""Quantizers that write exactly the bytes ggml writes.

    from ggmerge.convert.quants import quantize, dequantize, block_info, can_quantize
    raw = quantize(w, GGMLQuantizationType.Q4_K)     # uint8 (..., n_per_row // 256 * 144)
    w2 = dequantize(raw, GGMLQuantizationType.Q4_K)  # float32 (..., n_per_row)

``quantize`` reproduces ``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix=NULL)``
byte for byte, i.e. what llama-quantize writes without ``--imatrix``. Feed it the values llama.cpp
would see: a 16-bit source is converted to float32 first, so quantize bf16/f16-rounded values to
match a llama-quantize run on a bf16/f16 GGUF.

The per-type kernels are numba functions mirroring ggml's C line by line (:mod:`.legacy`,
:mod:`.kquants`, :mod:`.kquants_low`, primitives in :mod:`.ggml_float`), named in the table in
:mod:`.types` and loaded on first use of a type. A tensor is cut into chunks of whole blocks that
run on a few threads (the kernels release the GIL); memory is the output buffer plus a
few KB of scratch per chunk. The first use of a type on a machine compiles its kernel (2-6 s;
about 17 s for all of them), which numba caches on disk (``__pycache__`` beside the sources, or
numba's user cache directory when that is not writable): later processes load it in milliseconds,
after importing numba itself (~0.5 s).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as _gguf_quants

from ggmerge.cpus import default_threads
from ggmerge.errors import GGMergeError

from .types import TABLE, QuantType

__all__ = ["block_info", "can_quantize", "default_threads", "dequantize", "quantize"]

# values per chunk: big enough that a chunk costs far more than handing it to a thread, small
# enough that two threads share a tensor evenly on a busy machine
_MIN_CHUNK = 1 << 14
_MAX_CHUNK = 1 << 18


def block_info(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) of ``qtype``."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]


def can_quantize(qtype: GGMLQuantizationType) -> bool:
    """True if :func:`quantize` can write ``qtype``."""
    try:
        return GGMLQuantizationType(qtype) in TABLE
    except ValueError:
        return False



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
    flat = x.reshape(-1)
    out = np.empty(flat.size // bs * ts, dtype=np.uint8)
    if entry.kernel_name is None:  # F32: ggml_quantize_chunk memcpy's the values
        out[:] = flat.view(np.uint8)
        return out.reshape(x.shape[:-1] + (n_per_row // bs * ts,))
    kernel = entry.kernel()
    all_finite = _finite_check(entry)

    def run(lo: int, hi: int) -> None:  # blocks [lo, hi)
        chunk = flat[lo * bs:hi * bs]
        if all_finite is not None and not all_finite(chunk):
            raise GGMergeError(f"cannot quantize NaN or infinite values to {entry.qtype.name}",
                               tensor=tensor)
        kernel(chunk, out[lo * ts:hi * ts])

    n_blocks = flat.size // bs
    n_threads = max(1, threads or default_threads())
    per_chunk = max(_MIN_CHUNK // bs, min(_MAX_CHUNK // bs, -(-n_blocks // n_threads)), 1)
    spans = [(lo, min(lo + per_chunk, n_blocks)) for lo in range(0, n_blocks, per_chunk)]
    if n_threads == 1 or len(spans) <= 1:
        for lo, hi in spans:
            run(lo, hi)
    else:
        with ThreadPoolExecutor(min(n_threads, len(spans)), thread_name_prefix="ggmerge-quant") as pool:
            futures = [pool.submit(run, lo, hi) for lo, hi in spans]
            try:
                for f in futures:
                    f.result()
            except BaseException:  # an error or Ctrl-C: do not finish the rest of the tensor first
                for f in futures:
                    f.cancel()
                raise
    return out.reshape(x.shape[:-1] + (n_per_row // bs * ts,))


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values of ``raw`` (uint8 ``(..., bytes_per_row)``), by gguf-py's codecs."""
    return np.asarray(_gguf_quants.dequantize(np.asarray(raw), GGMLQuantizationType(qtype)),
                      dtype=np.float32)


def _finite_check(entry: QuantType):
    """The NaN/inf check for block types, None for float types (imports numba: only on use)."""
    if not entry.checks_finite:
        return None
    from .ggml_float import all_finite
    return all_finite


def _entry(qtype, tensor) -> QuantType:
    try:
        q = GGMLQuantizationType(qtype)
    except ValueError:
        raise GGMergeError(f"unknown GGML type {qtype!r}", tensor=tensor) from None
    if q not in TABLE:
        names = ", ".join(t.name for t in TABLE)
        raise GGMergeError(f"no quantizer for {q.name} (available: {names})", tensor=tensor)
    return TABLE[q]

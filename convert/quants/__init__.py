"""Quantizers that write exactly the bytes ggml writes.

    from ggmerge.convert.quants import quantize, dequantize, block_info, can_quantize
    raw = quantize(w, GGMLQuantizationType.Q4_K)     # uint8 (..., n_per_row // 256 * 144)
    w2 = dequantize(raw, GGMLQuantizationType.Q4_K)  # float32 (..., n_per_row)

``quantize`` reproduces ``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix)``
byte for byte, i.e. what llama-quantize writes, with ``imatrix=`` the per-column importance weights
of ``--imatrix`` (:mod:`.weighted`) or without (NULL: the ``*_ref`` kernels, and for IQ4_NL/IQ4_XS
their one search run unweighted). Feed it the values llama.cpp
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
             tensor: str | None = None, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 rows ``(..., n_per_row)`` to ``qtype``, exactly as ggml does.

    Returns uint8 ``(..., n_per_row // block_size * type_size)``. ``threads`` defaults to
    :func:`default_threads`; the bytes do not depend on it. ``tensor`` only names the tensor in errors.

    ``imatrix``: importance weights, float32 ``(n_per_row,)`` for every row, or ``(n_experts,
    n_per_row)`` for a 3-D ``data`` of shape ``(n_experts, rows, n_per_row)`` (expert ``e`` uses row
    ``e``, as llama-quantize's ``llama_tensor_quantize_impl`` does) — the bytes of
    ``ggml_quantize_chunk(..., imatrix)``. Types whose ggml quantizer ignores the weights (F32, F16,
    BF16, Q8_0) ignore them here too.
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
    out_shape = x.shape[:-1] + (n_per_row // bs * ts,)
    flat = x.reshape(-1)
    out = np.empty(flat.size // bs * ts, dtype=np.uint8)
    if entry.weighted_name is not None and (imatrix is not None or entry.kernel_name is None):
        _quantize_weighted(entry, x, out, imatrix, threads, tensor)
        return out.reshape(out_shape)
    if entry.kernel_name is None:  # F32: ggml_quantize_chunk memcpy's the values
        out[:] = flat.view(np.uint8)
        return out.reshape(out_shape)
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
    _run(run, [(lo, min(lo + per_chunk, n_blocks)) for lo in range(0, n_blocks, per_chunk)], n_threads)
    return out.reshape(out_shape)


def _run(run, spans: list[tuple[int, int]], n_threads: int) -> None:
    """``run(lo, hi)`` for every span, on up to ``n_threads`` threads (the kernels release the GIL)."""
    if n_threads == 1 or len(spans) <= 1:
        for lo, hi in spans:
            run(lo, hi)
        return
    with ThreadPoolExecutor(min(n_threads, len(spans)), thread_name_prefix="ggmerge-quant") as pool:
        futures = [pool.submit(run, lo, hi) for lo, hi in spans]
        try:
            for f in futures:
                f.result()
        except BaseException:  # an error or Ctrl-C: do not finish the rest of the tensor first
            for f in futures:
                f.cancel()
            raise


def _quantize_weighted(entry: QuantType, x: np.ndarray, out: np.ndarray, imatrix, threads, tensor) -> None:
    """The ``quantize_*`` path of ``ggml_quantize_chunk`` (:mod:`.weighted`), in chunks of whole rows."""
    bs, ts = entry.block_size, entry.type_size
    n_per_row = x.shape[-1]
    row_bytes = n_per_row // bs * ts
    n_rows = x.size // n_per_row if n_per_row else 0
    if imatrix is None:
        qws = np.empty((1, 0), np.float32)  # C's NULL
    else:
        qws = np.ascontiguousarray(imatrix, dtype=np.float32)
        qws = qws.reshape(1, -1) if qws.ndim == 1 else qws
        if qws.ndim != 2 or qws.shape[1] != n_per_row:
            raise GGMergeError(f"importance weights of shape {list(np.shape(imatrix))} do not fit rows of "
                               f"{n_per_row} values", tensor=tensor)
        if qws.shape[0] > 1 and (x.ndim != 3 or x.shape[0] != qws.shape[0]):
            raise GGMergeError(f"{qws.shape[0]} experts' importance weights for a tensor of shape "
                               f"{list(x.shape)}", tensor=tensor)
    per_expert = n_rows // qws.shape[0] if qws.shape[0] > 1 else max(n_rows, 1)
    kernel = entry.weighted_kernel()
    from .ggml_float import all_finite

    flat = x.reshape(-1)

    def run(lo: int, hi: int) -> None:  # rows [lo, hi), never across an expert boundary
        chunk = flat[lo * n_per_row:hi * n_per_row]
        if not all_finite(chunk):
            raise GGMergeError(f"cannot quantize NaN or infinite values to {entry.qtype.name}", tensor=tensor)
        kernel(chunk, out[lo * row_bytes:hi * row_bytes], qws[lo // per_expert if qws.shape[0] > 1 else 0])

    n_threads = max(1, threads or default_threads())
    rows_per = max(1, _MIN_CHUNK // max(n_per_row, 1), min(_MAX_CHUNK // max(n_per_row, 1),
                                                          -(-n_rows // n_threads)))
    spans = []
    for e0 in range(0, n_rows, per_expert):
        e1 = min(e0 + per_expert, n_rows)
        spans += [(lo, min(lo + rows_per, e1)) for lo in range(e0, e1, rows_per)]
    _run(run, spans, n_threads)


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

"""float32 arithmetic exactly as ggml's C quantizers do it.

ggml-base (which holds the ``quantize_row_*_ref`` functions) is compiled with plain ``-O3``: every
float operation is one IEEE float32 operation, rounded on its own (no FMA contraction, no
re-association). numpy's element-wise float32 ufuncs are the same IEEE operations, so an element-wise
mirror is exact by construction. Three things are not, and live here:

* sums: C adds term by term in index order; numpy's ``sum`` along a contiguous axis is pairwise.
  :func:`seq_sum` keeps C's order.
* ``nearest_int`` (ggml-quants.c) is a bit trick, equal to round-half-even only for |v| < 2**22.
* ``GGML_FP32_TO_FP16`` is round-to-nearest-even like numpy's cast, except that every NaN becomes
  0x7E00 (with the sign kept).

Vectorised layout used by the quantizers: a sub-block of ``n`` values is a *column*; arrays are
``(n, S)`` with one column per sub-block, so "element i of every sub-block" is one contiguous row.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23, the constant in ggml's nearest_int


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5*2**23 in float32 and keep the low 23 mantissa bits.

    Equals round-half-even for |v| < 2**22; beyond that (and for inf/NaN) it returns the same
    garbage the C code does, which matters for blocks with one huge outlier.
    """
    t = np.add(v, _MAGIC, dtype=F32)
    r = t.view(np.int32)
    np.bitwise_and(r, 0x007FFFFF, out=r)
    np.subtract(r, 0x00400000, out=r)
    return r


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """uint16 bits of ``GGML_FP32_TO_FP16`` (ggml_compute_fp32_to_fp16 in ggml-impl.h)."""
    v = np.asarray(v, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore"):
        h = v.astype(np.float16).view(np.uint16)
    nan = np.isnan(v)
    if nan.any():
        sign = (v.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)
        h = np.where(nan, sign | np.uint16(0x7E00), h)
    return h


def fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bits, value): the fp16 stored by ggml and ``GGML_FP16_TO_FP32`` of it."""
    bits = fp16_bits(v)
    return bits, bits.view(np.float16).astype(F32)


def seq_sum(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Sum over axis 0 as ``float s = 0; for (i) s += a[i];`` does, in float32.

    numpy reduces over a non-contiguous leading axis row by row (sequentially), which is C's order;
    with a single column the reduction axis becomes contiguous and numpy would sum pairwise, so narrow
    arrays are summed with an explicit loop.
    """
    if a.ndim == 2 and a.shape[1] >= 8 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0, out=out, initial=F32(0.0))
    acc = np.zeros(a.shape[1:], dtype=F32) if out is None else out
    if out is not None:
        acc[...] = 0
    for row in a:
        np.add(acc, row, out=acc)
    return acc


def seq_sum_from_first(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 as ``float s = a[0]; for (i = 1..) s += a[i];`` does (no leading +0)."""
    if a.ndim == 2 and a.shape[1] >= 8 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0)
    acc = a[0].astype(F32, copy=True)
    for row in a[1:]:
        np.add(acc, row, out=acc)
    return acc


def c_int_trunc(v: np.ndarray) -> np.ndarray:
    """C's float -> int conversion as x86-64 does it (``cvttss2si``): truncate toward zero;
    NaN and values outside int32 give INT32_MIN. Returned as int64 to allow further C casts."""
    v = np.asarray(v, dtype=F32)
    ok = np.isfinite(v) & (v > F32(-2147483904.0)) & (v < F32(2147483648.0))
    with np.errstate(invalid="ignore"):
        t = np.trunc(np.where(ok, v, F32(0))).astype(np.int64)
    return np.where(ok, t, np.int64(-2147483648))

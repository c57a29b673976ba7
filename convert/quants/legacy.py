"""F32/F16/BF16 and the 32-element block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

gguf-py's Q8_0 and BF16 codecs are byte-identical to ggml (checked against libggml), but slow on big
tensors (8 passes for roundf, uint64 temporaries); the mirrors here give the same bytes with fewer
passes. The others are written here because gguf-py's bytes differ from ggml's:

* Q4_0, Q5_0: for a block of zeros whose first element is ``-0.0`` gguf-py takes that element as the
  block's extreme and stores ``d = +0``; ggml starts from ``max = +0``, never replaces it (no
  ``|v| > 0``) and stores ``d = 0/-8 = -0`` (fp16 0x8000).
* Q4_1, Q5_1: ggml's min is the *first* of the smallest values (``if (v < min)``), so a block whose
  smallest values are ``+0`` and ``-0`` stores the sign of the first; numpy's ``min`` may pick either.
* F16: numpy keeps NaN payloads; ggml's ``GGML_FP32_TO_FP16`` writes every NaN as 0x7E00.

Input of every ``quantize_*`` here: float32 ``(n_blocks, block_size)``; output: uint8
``(n_blocks, type_size)``.
"""
from __future__ import annotations

import numpy as np

from .ggml_float import F32, c_int_trunc, fp16_bits


def quantize_f32(blocks: np.ndarray) -> np.ndarray:
    """F32: the bytes as they are (ggml_quantize_chunk memcpy's them)."""
    return np.ascontiguousarray(blocks, dtype=F32).view(np.uint8)


def quantize_f16(blocks: np.ndarray) -> np.ndarray:
    """ggml_fp32_to_fp16_row."""
    return np.ascontiguousarray(fp16_bits(blocks)).view(np.uint8)


def quantize_bf16(blocks: np.ndarray) -> np.ndarray:
    """ggml_fp32_to_bf16_row_ref: round to nearest even; NaN kept, made quiet (bit 6 of the bf16)."""
    u = np.ascontiguousarray(blocks, dtype=F32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    with np.errstate(over="ignore"):
        h = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16  # no wrap below NaN
    if nan.any():
        h = np.where(nan, (u >> 16) | np.uint32(64), h)
    return h.astype(np.uint16).view(np.uint8)


_HALF_DOWN = np.nextafter(F32(0.5), F32(0))  # trunc(x + copysign(this, x)) == roundf(x), all floats


def _to_small_int(v: np.ndarray, fast: bool) -> np.ndarray:
    """C's float -> int8_t/uint8_t conversion (low byte of x86's cvttss2si), as int32 or int64.

    ``fast``: the caller knows every value is finite and small (|v| < 2**31), where it is a plain
    truncation toward zero.
    """
    return v.astype(np.int32) if fast else c_int_trunc(v)


def _inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``."""
    return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))


def quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref: d (fp16), 32 int8 ``roundf(x/d)``, d = amax/127.

    Same bytes as gguf-py's codec (its ``np_roundf`` takes ~8 passes; this takes 3).
    """
    with np.errstate(all="ignore"):
        amax = np.max(np.abs(blocks), axis=1)
        d = amax / F32(127)
        inv = _inverse(d)
        x0 = blocks * inv[:, None]
        r = np.trunc(x0 + np.copysign(_HALF_DOWN, x0))
        # inv finite: |x0| <= 127; else (a subnormal block: 1/d overflows) C converts inf/NaN too
        q = _to_small_int(r, bool(np.isfinite(inv).all()))
    q = (q & 0xFF).astype(np.uint8)
    return np.concatenate([fp16_bits(d)[:, None].view(np.uint8), q], axis=1)


def _first_abs_max(blocks: np.ndarray) -> np.ndarray:
    """max of ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` from 0: the first element of
    largest magnitude, +0 for a block of zeros."""
    idx = np.argmax(np.abs(blocks), axis=1)[:, None]
    v = np.take_along_axis(blocks, idx, axis=1)[:, 0]
    return np.where(v != 0, v, F32(0))


def _signed_levels(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared part of quantize_row_q4_0_ref / q5_0_ref: d's fp16 bits and ``MIN(2*nmax-1,
    (int8_t)(x*id + nmax + 0.5f))`` as stored in a uint8."""
    with np.errstate(all="ignore"):
        d = _first_abs_max(blocks) / F32(-nmax)
        inv = _inverse(d)
        v = blocks * inv[:, None] + F32(nmax + 0.5)
        # inv finite: |x*id| <= nmax, v in [0.5, 2*nmax + 0.5]
        q = _to_small_int(v, bool(np.isfinite(inv).all()))
    q = ((q + 128) & 0xFF) - 128  # (int8_t)
    q = np.minimum(2 * nmax - 1, q) & 0xFF  # MIN(...) stored in a uint8_t
    return fp16_bits(d), q.astype(np.uint8)


def quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q4_0_ref: d (fp16), 16 bytes: element j in the low nibble, j+16 in the high."""
    d, q = _signed_levels(blocks, 8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([d[:, None].view(np.uint8), qs], axis=1)


def quantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q5_0_ref: d (fp16), 32-bit mask of 5th bits (little endian), 16 nibble bytes."""
    d, q = _signed_levels(blocks, 16)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")
    return np.concatenate([d[:, None].view(np.uint8), qh, qs], axis=1)


def _first_extreme(blocks: np.ndarray, pick) -> np.ndarray:
    """The block's min/max as C's strict ``<``/``>`` scan keeps it: the first of equal values, which
    only shows for +0 vs -0."""
    m = pick(blocks, axis=1)
    zero = m == 0
    if zero.any():
        z = blocks[zero]
        idx = np.argmax(z == 0, axis=1)[:, None]
        m[zero] = np.take_along_axis(z, idx, axis=1)[:, 0]
    return m


def _affine_levels(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared part of quantize_row_q4_1_ref / q5_1_ref: fp16 bits of d and min, and
    ``(int)((x - min)*id + 0.5f)`` (before the per-type narrowing)."""
    with np.errstate(all="ignore"):
        mn = _first_extreme(blocks, np.min)
        mx = _first_extreme(blocks, np.max)
        d = (mx - mn) / F32(nmax)
        inv = _inverse(d)
        v = (blocks - mn[:, None]) * inv[:, None] + F32(0.5)
        # d and 1/d finite: 0 <= (x - min)*id <= nmax (1 + eps)
        q = _to_small_int(v, bool(np.isfinite(inv).all() and np.isfinite(d).all()))
    return fp16_bits(d), fp16_bits(mn), q


def quantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q4_1_ref: d, min (fp16), 16 bytes: element j low nibble, j+16 high nibble."""
    d, m, q = _affine_levels(blocks, 15)
    q = (np.minimum(15, ((q + 128) & 0xFF) - 128) & 0xFF).astype(np.uint8)  # MIN(15, (int8_t)...)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([d[:, None].view(np.uint8), m[:, None].view(np.uint8), qs], axis=1)


def quantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q5_1_ref: d, min, 32-bit mask of 5th bits, 16 nibble bytes."""
    d, m, q = _affine_levels(blocks, 31)
    q = (q & 0xFF).astype(np.uint8)  # (uint8_t)(...), no clamp in the reference
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")
    return np.concatenate([d[:, None].view(np.uint8), m[:, None].view(np.uint8), qh, qs], axis=1)

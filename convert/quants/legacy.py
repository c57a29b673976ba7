"""F16, BF16 and the 32-element block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (numba kernels).

Each kernel mirrors its C function in ggml (ggml-quants.c, ggml.c) line by line, in float32 (see
:mod:`.ggml_float`). Signature of every kernel: ``(x, out)`` with ``x`` contiguous float32 holding
whole blocks and ``out`` the contiguous uint8 buffer they encode into (``len(x) // block_size *
type_size`` bytes). Details of C that the bytes depend on, kept here on purpose:

* Q4_0, Q5_0: the extreme starts at ``+0`` and is replaced only by a strictly larger magnitude, so a
  block of zeros (even ``-0``) stores ``d = 0/-8 = -0`` (fp16 0x8000).
* Q4_1, Q5_1: min/max start at ``FLT_MAX``/``-FLT_MAX`` and strict ``<``/``>`` keep the first of equal
  values (+0 vs -0 shows in the stored min).
* Q8_0's ``amax`` is taken as an integer max over the bits of ``|v|``: for the finite values
  ``quantize`` lets through that is the same value, and it vectorises (float max does not without
  fastmath).
* Conversions ``(int8_t)``, ``(uint8_t)`` of a float are x86-64's truncation (:func:`c_int`), which a
  subnormal block (whose ``1/d`` overflows) reaches with inf/NaN.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .ggml_float import (
    F32,
    JIT,
    bf16_bits,
    bits_f32,
    c_int,
    f32_bits,
    fp16_bits,
    fp16_store,
    int8,
    roundf,
)

_FLT_MAX = F32(3.4028234663852886e38)
_ZERO = F32(0.0)
_ONE = F32(1.0)
_HALF = F32(0.5)
_Q4_0_OFFSET = F32(8.5)  # nmax + 0.5f of quantize_row_q4_0_ref
_Q5_0_OFFSET = F32(16.5)


@njit(**JIT)
def quantize_f16(x, out):
    """ggml_fp32_to_fp16_row."""
    for i in range(x.size):
        h = fp16_bits(x[i])
        out[2 * i] = h & 0xFF
        out[2 * i + 1] = h >> 8


@njit(**JIT)
def quantize_bf16(x, out):
    """ggml_fp32_to_bf16_row_ref."""
    for i in range(x.size):
        h = bf16_bits(x[i])
        out[2 * i] = h & 0xFF
        out[2 * i + 1] = h >> 8


@njit(**JIT)
def quantize_q8_0(x, out):
    """quantize_row_q8_0_ref: d (fp16), 32 int8 ``roundf(x/d)``, d = amax/127."""
    for ib in range(x.size // 32):
        xb = x[32 * ib:32 * ib + 32]
        o = 34 * ib
        m = np.uint32(0)  # MAX(amax, fabsf(v)) from 0, on the bits of |v| (same order, finite)
        for j in range(32):
            a = f32_bits(xb[j]) & np.uint32(0x7FFFFFFF)
            m = a if a > m else m  # noqa: FURB136
        d = bits_f32(m) / F32(127)
        inv = _ONE / d if d != 0 else _ZERO
        fp16_store(out, o, d)
        for j in range(32):
            out[o + 2 + j] = c_int(roundf(xb[j] * inv)) & 0xFF


@njit(**JIT)
def _abs_extreme(xb):
    """``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` from ``amax = max = 0``: ``max``."""
    amax = _ZERO
    vmax = _ZERO
    for j in range(32):
        a = abs(xb[j])
        if amax < a:
            amax = a
            vmax = xb[j]
    return vmax


@njit(**JIT)
def _min_max(xb):
    """The min and max as quantize_row_q4_1_ref's scan finds them."""
    lo = _FLT_MAX
    hi = -_FLT_MAX
    for j in range(32):
        v = xb[j]
        if v < lo:  # noqa: PLR1730 (C's compares, see ggml_float)
            lo = v
        if v > hi:  # noqa: PLR1730
            hi = v
    return lo, hi


@njit(**JIT)
def quantize_q4_0(x, out):
    """quantize_row_q4_0_ref: d (fp16), 16 bytes: element j in the low nibble, j+16 in the high."""
    for ib in range(x.size // 32):
        xb = x[32 * ib:32 * ib + 32]
        o = 18 * ib
        d = _abs_extreme(xb) / F32(-8)
        inv = _ONE / d if d != 0 else _ZERO
        fp16_store(out, o, d)
        for j in range(16):
            q0 = min(15, int8(c_int(xb[j] * inv + _Q4_0_OFFSET))) & 0xFF
            q1 = min(15, int8(c_int(xb[16 + j] * inv + _Q4_0_OFFSET))) & 0xFF
            out[o + 2 + j] = (q0 | (q1 << 4)) & 0xFF


@njit(**JIT)
def quantize_q5_0(x, out):
    """quantize_row_q5_0_ref: d (fp16), 32-bit mask of 5th bits (little endian), 16 nibble bytes."""
    for ib in range(x.size // 32):
        xb = x[32 * ib:32 * ib + 32]
        o = 22 * ib
        d = _abs_extreme(xb) / F32(-16)
        inv = _ONE / d if d != 0 else _ZERO
        fp16_store(out, o, d)
        qh = 0
        for j in range(16):
            q0 = min(31, int8(c_int(xb[j] * inv + _Q5_0_OFFSET))) & 0xFF
            q1 = min(31, int8(c_int(xb[16 + j] * inv + _Q5_0_OFFSET))) & 0xFF
            out[o + 6 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
            qh |= ((q0 & 0x10) >> 4) << j
            qh |= ((q1 & 0x10) >> 4) << (j + 16)
        for k in range(4):
            out[o + 2 + k] = (qh >> (8 * k)) & 0xFF


@njit(**JIT)
def quantize_q4_1(x, out):
    """quantize_row_q4_1_ref: d, min (fp16), 16 bytes: element j low nibble, j+16 high nibble."""
    for ib in range(x.size // 32):
        xb = x[32 * ib:32 * ib + 32]
        o = 20 * ib
        lo, hi = _min_max(xb)
        d = (hi - lo) / F32(15)
        inv = _ONE / d if d != 0 else _ZERO
        fp16_store(out, o, d)
        fp16_store(out, o + 2, lo)
        for j in range(16):
            q0 = min(15, int8(c_int((xb[j] - lo) * inv + _HALF))) & 0xFF
            q1 = min(15, int8(c_int((xb[16 + j] - lo) * inv + _HALF))) & 0xFF
            out[o + 4 + j] = (q0 | (q1 << 4)) & 0xFF


@njit(**JIT)
def quantize_q5_1(x, out):
    """quantize_row_q5_1_ref: d, min, 32-bit mask of 5th bits, 16 nibble bytes (no clamp in C)."""
    for ib in range(x.size // 32):
        xb = x[32 * ib:32 * ib + 32]
        o = 24 * ib
        lo, hi = _min_max(xb)
        d = (hi - lo) / F32(31)
        inv = _ONE / d if d != 0 else _ZERO
        fp16_store(out, o, d)
        fp16_store(out, o + 2, lo)
        qh = 0
        for j in range(16):
            q0 = c_int((xb[j] - lo) * inv + _HALF) & 0xFF  # (uint8_t)
            q1 = c_int((xb[16 + j] - lo) * inv + _HALF) & 0xFF
            out[o + 8 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
            qh |= ((q0 & 0x10) >> 4) << j
            qh |= ((q1 & 0x10) >> 4) << (j + 16)
        for k in range(4):
            out[o + 4 + k] = (qh >> (8 * k)) & 0xFF


"""float32 scalar primitives exactly as ggml's C quantizers compute them (numba, nopython).

ggml-base (which holds the ``quantize_row_*_ref`` functions) is compiled with plain ``-O3``: every
float operation is one IEEE float32 operation, rounded on its own, in source order (no FMA
contraction, no re-association). numba without ``fastmath`` emits the same LLVM operations, so a
line-by-line mirror in float32 gives the same bits. Two traps make that "in float32" a rule to keep
by hand in every kernel: numba (like numpy) promotes ``float32 * int`` and ``float32 * 0.5`` to
float64, so integers are converted with ``F32(l)`` (what C's usual arithmetic conversions do) and
every float constant is a float32 global.

What C does through bit patterns or conversions lives here:

* :func:`nearest_int` (ggml-quants.c): add 1.5*2**23 and keep the low 23 mantissa bits.
  Round-half-to-even for |v| < 2**22; beyond that the same garbage C returns (it matters for blocks
  with one huge outlier, whose levels land far outside the range).
* :func:`fp16_bits` / :func:`fp16_value`: ``ggml_compute_fp32_to_fp16`` / ``_fp16_to_fp32``
  (ggml-impl.h): IEEE round-to-nearest-even, every NaN stored as 0x7E00 with its sign.
* :func:`bf16_bits`: ``ggml_compute_fp32_to_bf16``.
* :func:`c_int`: C's float -> int conversion as x86-64 does it (``cvttss2si``): truncate toward
  zero; NaN and out-of-range give INT32_MIN, whose low byte (0) is what an ``int8_t`` keeps.
* :func:`roundf`: half away from zero.

C's compare-and-assign (``if (v < min) min = v;``) is kept as written everywhere, never turned into
``min()``/``max()``: which of +0/-0 (or of a NaN) survives depends on the exact comparison.

Kernels that call these are compiled with ``cache=True``. numba's cache notices edits to a kernel's
own file only, not to the files it calls into: after editing this file (or ``kquants.py``, which
``kquants_low.py`` calls), delete ``__pycache__/*.nbi`` and ``*.nbc`` here.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: below this a group counts as all zero
_MAGIC = F32(12582912.0)  # 1.5 * 2**23
_TO_INF = F32(2.0 ** 112)  # ggml_compute_fp32_to_fp16's scale_to_inf
_TO_ZERO = F32(2.0 ** -110)  # ... and scale_to_zero
_SUBNORMAL_HALF = F32(2.0 ** -24)  # value of the fp16 subnormal mantissa unit
_HALF = F32(0.5)
_ONE = F32(1.0)
_I32_LO = F32(-2147483904.0)  # the float below -2**31: values above it truncate into int32
_I32_HI = F32(2147483648.0)  # 2**31

# The flags of every kernel, in one place. No fastmath: it would re-associate sums and fuse a*b+c
# into FMA, i.e. not C's float32 operations. error_model "numpy": x/0 gives inf/NaN as in C, not
# ZeroDivisionError. nogil: chunks of a tensor run on threads. cache: compile once per machine.
JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@intrinsic
def f32_bits(typingctx, x):
    """uint32 bit pattern of a float32 (C's ``memcpy(&i, &f, 4)``)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, u):
    """float32 whose bit pattern is the low 32 bits of the integer ``u``."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if u.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif u.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(u), codegen


@njit(**JIT)
def nearest_int(v):
    """ggml's ``nearest_int(float)`` bit trick, returned as int64."""
    return np.int64(f32_bits(v + _MAGIC) & np.uint32(0x007FFFFF)) - 0x00400000


@njit(**JIT)
def fp16_bits(f):
    """uint16 bits (as int64) of ``ggml_compute_fp32_to_fp16(f)``, step by step."""
    base = (abs(f) * _TO_INF) * _TO_ZERO
    w = np.int64(f32_bits(f))
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:  # noqa: PLR1730 (as C writes it)
        bias = 0x71000000
    base = bits_f32((bias >> 1) + 0x07800000) + base
    bits = np.int64(f32_bits(base))
    nonsign = ((bits >> 13) & 0x00007C00) + (bits & 0x00000FFF)
    return ((sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)) & 0xFFFF


@njit(**JIT)
def fp16_value(h):
    """``GGML_FP16_TO_FP32``: the exact float32 value of fp16 bits ``h``."""
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:
        v = F32(mant) * _SUBNORMAL_HALF  # exact: at most 10 significant bits
        return -v if sign else v
    if exp == 31:
        return bits_f32(sign | 0x7F800000 | (mant << 13))
    return bits_f32(sign | ((exp + 112) << 23) | (mant << 13))


@njit(**JIT)
def fp16_store(out, at, f):
    """Store ``GGML_FP32_TO_FP16(f)`` little-endian at ``out[at:at + 2]``; return its float32 value."""
    h = fp16_bits(f)
    out[at] = h & 0xFF
    out[at + 1] = h >> 8
    return fp16_value(h)


@njit(**JIT)
def bf16_bits(f):
    """uint16 bits (as int64) of ``ggml_compute_fp32_to_bf16(f)``: nearest even; NaN made quiet."""
    u = np.int64(f32_bits(f))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return ((u >> 16) | 64) & 0xFFFF
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF


@njit(**JIT)
def c_int(v):
    """C's ``(int)v`` for a float32 on x86-64 (``cvttss2si``), as int64."""
    if v > _I32_LO and v < _I32_HI:
        return np.int64(v)
    return np.int64(-2147483648)


@njit(**JIT)
def int8(i):
    """C's conversion of an int to ``int8_t``: the low byte, sign-extended."""
    return ((i & 0xFF) ^ 0x80) - 0x80


@njit(**JIT)
def roundf(v):
    """C's ``roundf``: nearest integer, halves away from zero (float32 in, float32 out)."""
    a = abs(v)
    r = np.floor(a)
    if a - r >= _HALF:  # exact: a - floor(a) is representable for every float32
        r = r + _ONE
    return np.float32(np.copysign(r, v))


@njit(**JIT)
def all_finite(x):
    """True if no element of the float32 array ``x`` is NaN or infinite (one integer pass)."""
    m = np.uint32(0)
    for v in x:
        b = f32_bits(v) & np.uint32(0x7FFFFFFF)
        m = b if b > m else m  # noqa: FURB136
    return m < np.uint32(0x7F800000)

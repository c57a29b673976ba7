"""Q2_K and Q3_K (numba kernels), byte-identical to ggml's ``quantize_row_q{2,3}_K_ref``.

Same approach and kernel signature as :mod:`.kquants`: C's float32 operations in C's order.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .ggml_float import GROUP_MAX_EPS, JIT, F32, fp16_store, int8, nearest_int
from .kquants import QK_K, make_qkx2_quants

_ZERO = F32(0.0)
_ONE = F32(1.0)


@njit(**JIT)
def _pack_2bit(L, qs):
    """qs of Q2_K/Q3_K: byte ``j/4 + l`` holds levels ``j+l, j+l+32, j+l+64, j+l+96`` (2 bits each)."""
    for h in range(2):
        for l in range(32):
            j = 128 * h + l
            qs[32 * h + l] = L[j] | (L[j + 32] << 2) | (L[j + 64] << 4) | (L[j + 96] << 6)


@njit(**JIT)
def quantize_q2_k(x, out):
    """quantize_row_q2_K_ref: 16 scale/min nibble pairs, 64 bytes of 2-bit levels, d, dmin."""
    L = np.empty(QK_K, np.uint8)
    Laux = np.empty(16, np.uint8)
    weights = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    q4scale = F32(15)
    for ib in range(x.size // QK_K):
        xb = x[QK_K * ib:QK_K * (ib + 1)]
        ob = out[84 * ib:84 * (ib + 1)]
        max_scale = _ZERO
        max_min = _ZERO
        for j in range(16):
            xs = xb[16 * j:16 * j + 16]
            for l in range(16):
                weights[l] = abs(xs[l])
            s, m = make_qkx2_quants(16, 3, xs, weights, L[16 * j:16 * j + 16], Laux,
                                    F32(-0.5), F32(0.1), 15, True)
            scales[j] = s
            mins[j] = m
            if s > max_scale:
                max_scale = s
            if m > max_min:
                max_min = m
        if max_scale > 0:
            iscale = q4scale / max_scale
            for j in range(16):
                ob[j] = nearest_int(iscale * scales[j]) & 0xFF
            d = fp16_store(ob, 80, max_scale / q4scale)
        else:
            for j in range(16):
                ob[j] = 0
            d = fp16_store(ob, 80, _ZERO)
        if max_min > 0:
            iscale = q4scale / max_min
            for j in range(16):
                ob[j] = (ob[j] | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
            dmin = fp16_store(ob, 82, max_min / q4scale)
        else:
            dmin = fp16_store(ob, 82, _ZERO)
        for j in range(16):
            dj = d * F32(ob[j] & 0xF)
            if dj == 0:
                continue
            dm = dmin * F32(ob[j] >> 4)
            for ii in range(16):
                L[16 * j + ii] = max(0, min(3, nearest_int((xb[16 * j + ii] + dm) / dj)))
        _pack_2bit(L, ob[16:80])


@njit(**JIT)
def make_q3_quants(n, nmax, x, L):
    """make_q3_quants(n, nmax, x, L, do_rmse=true): levels + nmax in ``L`` (int8); returns scale.

    The refinement visits the elements one after the other and each accepted change feeds the next.
    """
    vmax = _ZERO
    amax = _ZERO
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _ZERO
    iscale = F32(-nmax) / vmax
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l
        w = x[i] * x[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fli = F32(L[i])
            slx = sumlx - w * x[i] * fli
            if slx > 0:
                sl2 = suml2 - w * fli * fli
                new_l = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    fl = F32(new_l)
                    slx += w * x[i] * fl
                    sl2 += w * fl * fl
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else _ZERO


@njit(**JIT)
def quantize_q3_k(x, out):
    """quantize_row_q3_K_ref: 32 bytes high-bit mask, 64 bytes of low 2 bits, 12 scale bytes, d."""
    L = np.empty(QK_K, np.int8)
    scales = np.empty(16, np.float32)
    lv = np.empty(16, np.int64)
    for ib in range(x.size // QK_K):
        xb = x[QK_K * ib:QK_K * (ib + 1)]
        ob = out[110 * ib:110 * (ib + 1)]
        max_scale = _ZERO
        amax = _ZERO
        for j in range(16):
            s = make_q3_quants(16, 4, xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
            scales[j] = s
            a = abs(s)
            if a > amax:
                amax = a
                max_scale = s
        sc = ob[96:108]
        sc[:] = 0
        if max_scale != 0:
            iscale = F32(-32) / max_scale
            for j in range(16):
                lv[j] = max(-32, min(31, int8(nearest_int(iscale * scales[j])))) + 32
                if j < 8:
                    sc[j] = lv[j] & 0xF
                else:
                    sc[j - 8] |= (lv[j] & 0xF) << 4
                sc[j % 4 + 8] |= (lv[j] >> 4) << (2 * (j // 4))
            d = fp16_store(ob, 108, _ONE / iscale)
        else:
            lv[:] = 0
            d = fp16_store(ob, 108, _ZERO)
        for j in range(16):
            dj = d * F32(lv[j] - 32)  # the scale read back from the packed bytes
            if dj == 0:
                continue
            for ii in range(16):
                L[16 * j + ii] = max(-4, min(3, nearest_int(xb[16 * j + ii] / dj))) + 4
        hmask = ob[0:32]
        hmask[:] = 0
        for j in range(QK_K):
            if L[j] > 3:
                hmask[j % 32] |= 1 << (j // 32)
                L[j] -= 4
        _pack_2bit(L, ob[32:96])

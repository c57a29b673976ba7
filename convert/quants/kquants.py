"""Q4_K, Q5_K and Q6_K (numba kernels), byte-identical to ggml's ``quantize_row_q{4,5,6}_K_ref``.

Each function mirrors its C namesake in ggml/src/ggml-quants.c statement by statement, in float32
and in C's order (see :mod:`.ggml_float` for why that is exact and for the two typing traps). Kernel
signature: ``(x, out)``, ``x`` contiguous float32 holding whole 256-value super-blocks, ``out`` the
contiguous uint8 buffer for them. Scope: no importance matrix (llama-quantize without ``--imatrix``
calls exactly these references).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .ggml_float import GROUP_MAX_EPS, JIT, F32, fp16_store, int8, nearest_int

QK_K = 256
_ZERO = F32(0.0)
_ONE = F32(1.0)
_TENTH = F32(0.1)  # the 0.1f of the scale searches


@njit(**JIT)
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants: levels ``L`` (uint8, 0..nmax) and returns ``(scale, the_min)``.

    ``rmin``/``rdelta`` must be float32. As in C, ``min`` is updated inside the step loop, so later
    steps quantize around the best minimum found so far.
    """
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = _ZERO
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _ZERO, -mn
    fnmax = F32(nmax)
    iscale = fnmax / (mx - mn)
    scale = _ONE / iscale
    best_error = _ZERO
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
        L[i] = l
        diff = scale * F32(l) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + fnmax) / (mx - mn)
        sum_l = _ZERO
        sum_l2 = _ZERO
        sum_xl = _ZERO
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
            Laux[i] = l
            w = weights[i]
            fl = F32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = _ZERO
                this_scale = sum_xl / sum_l2
            cur_error = _ZERO
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(**JIT)
def make_qx_quants_rmse1(n, nmax, x, L):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL): levels + nmax in ``L``; returns scale."""
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
        L[i] = l + nmax
        w = x[i] * x[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else _ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + _TENTH * F32(step)) / vmax
        sumlx = _ZERO
        suml2 = _ZERO
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            w = x[i] * x[i]
            fl = F32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**JIT)
def _q45_k_head(xb, ob, nmax, rmin, nstep, L, Laux, weights, scales, mins, ls, lm):
    """The shared part of quantize_row_q4_K_ref / quantize_row_q5_K_ref for one super-block: writes
    d, dmin and the 12 packed 6-bit scale/min bytes into ``ob[0:16]`` and the levels into ``L``.
    The arguments after ``nstep`` are scratch (see :func:`_q45_scratch`)."""
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(8):
        xs = xb[32 * j:32 * j + 32]
        sum_x2 = _ZERO
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / F32(32))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        s, m = make_qkx2_quants(32, nmax, xs, weights, L[32 * j:32 * j + 32], Laux,
                                rmin, _TENTH, nstep, False)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = F32(63) / max_scale if max_scale > 0 else _ZERO
    inv_min = F32(63) / max_min if max_min > 0 else _ZERO
    for j in range(8):
        ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # uint8_t, then MIN
        lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    # the packing read back by get_scale_min_k4
    for j in range(4):
        ob[4 + j] = ls[j] | ((ls[j + 4] >> 4) << 6)
        ob[8 + j] = lm[j] | ((lm[j + 4] >> 4) << 6)
        ob[12 + j] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4)
    d = fp16_store(ob, 0, max_scale / F32(63))
    dmin = fp16_store(ob, 2, max_min / F32(63))
    for j in range(8):
        dj = d * F32(ls[j])
        if dj == 0:
            continue
        dm = dmin * F32(lm[j])
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int((xb[32 * j + ii] + dm) / dj)))


@njit(**JIT)
def _q45_scratch():
    """L, Laux, weights, scales, mins, ls, lm of quantize_row_q4_K_ref, allocated once per call."""
    return (np.empty(QK_K, np.uint8), np.empty(32, np.uint8), np.empty(32, np.float32),
            np.empty(8, np.float32), np.empty(8, np.float32), np.empty(8, np.int64), np.empty(8, np.int64))


@njit(**JIT)
def quantize_q4_k(x, out):
    """quantize_row_q4_K_ref: d, dmin (fp16), 12 scale bytes, 128 bytes of 4-bit levels."""
    L, Laux, weights, scales, mins, ls, lm = _q45_scratch()
    for ib in range(x.size // QK_K):
        xb = x[QK_K * ib:QK_K * (ib + 1)]
        ob = out[144 * ib:144 * (ib + 1)]
        _q45_k_head(xb, ob, 15, F32(-1.0), 20, L, Laux, weights, scales, mins, ls, lm)
        for k in range(4):
            for l in range(32):
                ob[16 + 32 * k + l] = L[64 * k + l] | (L[64 * k + 32 + l] << 4)


@njit(**JIT)
def quantize_q5_k(x, out):
    """quantize_row_q5_K_ref: d, dmin, 12 scale bytes, 32 bytes of 5th bits, 128 of low nibbles."""
    L, Laux, weights, scales, mins, ls, lm = _q45_scratch()
    for ib in range(x.size // QK_K):
        xb = x[QK_K * ib:QK_K * (ib + 1)]
        ob = out[176 * ib:176 * (ib + 1)]
        _q45_k_head(xb, ob, 31, F32(-0.5), 15, L, Laux, weights, scales, mins, ls, lm)
        for j in range(32):
            ob[16 + j] = 0
        for k in range(4):
            m1 = 1 << (2 * k)
            for j in range(32):
                l1 = np.int64(L[64 * k + j])
                l2 = np.int64(L[64 * k + 32 + j])
                hb = 0
                if l1 > 15:
                    l1 -= 16
                    hb |= m1
                if l2 > 15:
                    l2 -= 16
                    hb |= m1 << 1
                ob[16 + j] |= hb
                ob[48 + 32 * k + j] = l1 | (l2 << 4)


@njit(**JIT)
def quantize_q6_k(x, out):
    """quantize_row_q6_K_ref: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, d."""
    L = np.empty(QK_K, np.uint8)
    scales = np.empty(16, np.float32)
    for ib in range(x.size // QK_K):
        xb = x[QK_K * ib:QK_K * (ib + 1)]
        ob = out[210 * ib:210 * (ib + 1)]
        max_scale = _ZERO
        max_abs_scale = _ZERO
        for j in range(16):
            s = make_qx_quants_rmse1(16, 32, xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
            scales[j] = s
            a = abs(s)
            if a > max_abs_scale:
                max_abs_scale = a
                max_scale = s
        if max_abs_scale < GROUP_MAX_EPS:
            ob[:] = 0  # memset; d = fp16(0) is 0 as well
            continue
        iscale = F32(-128) / max_scale
        d = fp16_store(ob, 208, _ONE / iscale)
        for j in range(16):
            ob[192 + j] = min(127, nearest_int(iscale * scales[j])) & 0xFF  # int8_t
        for j in range(16):
            dj = d * F32(int8(ob[192 + j]))
            if dj == 0:
                continue
            for ii in range(16):
                L[16 * j + ii] = max(-32, min(31, nearest_int(xb[16 * j + ii] / dj))) + 32
        for h in range(2):
            Lh = L[128 * h:128 * (h + 1)]
            for l in range(32):
                ob[64 * h + l] = (Lh[l] & 0xF) | ((Lh[l + 64] & 0xF) << 4)
                ob[64 * h + 32 + l] = (Lh[l + 32] & 0xF) | ((Lh[l + 96] & 0xF) << 4)
                ob[128 + 32 * h + l] = ((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2)
                                        | ((Lh[l + 64] >> 4) << 4) | ((Lh[l + 96] >> 4) << 6))

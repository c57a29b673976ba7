"""Importance-weighted quantizers (numba), byte-identical to ggml's ``quantize_*`` with ``quant_weights``.

With an imatrix, llama-quantize calls ``ggml_quantize_chunk(type, ..., imatrix)``, which for the
K-quants and the 32-block legacy types takes other code than the ``*_ref`` functions of
:mod:`.kquants`/:mod:`.legacy`: ``quantize_row_q{2..6}_K_impl`` and ``quantize_row_q{4,5}_{0,1}_impl``
with their helpers ``make_qkx3_quants``, ``make_qp_quants`` and ``make_qx_quants(..., qw)``, all in
ggml/src/ggml-quants.c. IQ4_NL and IQ4_XS have one path with or without weights
(``quantize_iq4_nl``/``quantize_iq4_xs`` → ``quantize_row_iq4_nl_impl`` with ``ntry = 7``).

Each function mirrors its C namesake statement by statement in float32 and C's order (the rules are
in :mod:`.ggml_float`: ints converted with ``F32``, constants float32, compares as C writes them,
uint8/int8 stores wrapped like C's). These are plain scalar loops, not the lane-interleaved kernels of
:mod:`.kquants`: simpler to check against C, and the imatrix path is not the hot one.

Kernel signature: ``kernel(x, out, qw)`` with ``x`` whole rows of float32 (flattened), ``out`` their
uint8 encoding and ``qw`` the row's importance weights (``n_per_row`` float32; empty = C's NULL,
allowed only for the IQ4 types). Rows are independent, so a tensor is cut into chunks of whole rows.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .ggml_float import F32, GROUP_MAX_EPS, JIT, fp16_store, int8, nearest_int
from .kquants import _pack_q5, _q6_k_block
from .kquants_low import _pack_2bit

QK_K = 256
_ZERO = F32(0.0)
_ONE = F32(1.0)
_TWO = F32(2.0)
_TENTH = F32(0.1)
_RMIN3 = F32(-0.9)  # make_qkx3_quants(..., -0.9f, 0.05f, 36, false) in every caller
_RDELTA3 = F32(0.05)
_NSTEP3 = 36

#: kvalues_iq4nl (ggml-common.h): the 16 non-linear levels of IQ4_NL / IQ4_XS
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                         dtype=np.int8)


# --- helpers ----------------------------------------------------------------------------------------

@njit(**JIT)
def make_qx_w(x, nmax, L, qw):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) with non-NULL ``qw``: levels + nmax into ``L``."""
    n = x.size
    mx = _ZERO
    amax = _ZERO
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _ZERO
    iscale = F32(-nmax) / mx
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l + nmax
        w = qw[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else _ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + _TENTH * F32(step)) / mx
        sumlx = _ZERO
        suml2 = _ZERO
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            w = qw[i]
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
def make_qkx3(x, nmax, weights, L, Laux):
    """make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, -0.9f, 0.05f, 36, false):
    (scale, the_min). As in C, ``min`` moves inside the step loop."""
    n = x.size
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:  # noqa: PLR1730 (C's compares, see ggml_float)
            mn = x[i]
        if x[i] > mx:  # noqa: PLR1730
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = _ZERO
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return _ZERO, -mn
    iscale = F32(nmax) / (mx - mn)
    scale = _ONE / iscale
    best_mad = _ZERO
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
        L[i] = l
        diff = scale * F32(l) + mn - x[i]
        best_mad += weights[i] * (diff * diff)
    for step in range(_NSTEP3 + 1):
        iscale = (_RMIN3 + _RDELTA3 * F32(step) + F32(nmax)) / (mx - mn)
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
            mad = _ZERO
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                mad += weights[i] * (diff * diff)
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(**JIT)
def make_qp(x, nmax, L, qw):
    """make_qp_quants(n, nmax, x, L, quant_weights): levels (uint8, wrapped like C) into ``L``."""
    n = x.size
    mx = _ZERO
    for i in range(n):
        mx = mx if mx > x[i] else x[i]  # MAX(max, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _ZERO
    iscale = F32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = _ONE / iscale
    best_mse = _ZERO
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_TENTH * F32(step) + F32(nmax)) / mx
        scale_is = _ONE / iscale_is
        mse = _ZERO
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        w = qw[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            li = np.int64(L[i])
            fli = F32(li)
            slx = sumlx - w * x[i] * fli
            sl2 = suml2 - w * fli * fli
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != li:
                    fl = F32(new_l)
                    slx += w * x[i] * fl
                    sl2 += w * fl * fl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else _ZERO


@njit(**JIT)
def _sigma2(x, lo, hi):
    """Sequential float32 sum of squares of ``x[lo:hi]`` (the ``sum_x2`` of every impl)."""
    s = _ZERO
    for j in range(lo, hi):
        s += x[j] * x[j]
    return s


@njit(**JIT)
def _weights(xb, qw, sigma2, weight):
    """``weight[l] = qw[l] * sqrtf(sigma2 + x[l]*x[l])``, the weighting every impl applies."""
    for l in range(xb.size):
        weight[l] = qw[l] * np.sqrt(sigma2 + xb[l] * xb[l])
    s = _ZERO
    for l in range(xb.size):
        s += weight[l]
    return s


# --- K-quants ---------------------------------------------------------------------------------------

@njit(**JIT)
def quantize_q2_k_w(x, out, qw):
    """quantize_q2_K with quant_weights: quantize_row_q2_K_impl on every row."""
    npr = qw.size
    nbr = npr // QK_K
    L = np.empty(QK_K, np.uint8)
    Laux = np.empty(16, np.uint8)
    mins = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    weight = np.empty(16, np.float32)
    Ls = np.empty(16, np.uint8)
    Lm = np.empty(16, np.uint8)
    for ib in range(x.size // QK_K):
        xb = x[QK_K * ib:QK_K * (ib + 1)]
        ob = out[84 * ib:84 * (ib + 1)]
        qb = qw[QK_K * (ib % nbr):]
        sigma2 = _sigma2(xb, 0, QK_K) / F32(QK_K)
        for j in range(16):
            sw[j] = _weights(xb[16 * j:16 * j + 16], qb[16 * j:16 * j + 16], sigma2, weight)
            scales[j], mins[j] = make_qkx3(xb[16 * j:16 * j + 16], 3, weight, L[16 * j:16 * j + 16], Laux)
        dm = make_qp(scales, 15, Ls, sw)
        mm = make_qp(mins, 15, Lm, sw)
        dm = fp16_store(ob, 80, dm)
        mm = fp16_store(ob, 82, mm)
        for j in range(16):
            ob[j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
        for j in range(16):
            d = dm * F32(ob[j] & 0xF)
            if d == 0:
                continue
            m = mm * F32(ob[j] >> 4)
            for ii in range(16):
                L[16 * j + ii] = max(0, min(3, nearest_int((xb[16 * j + ii] + m) / d)))
        _pack_2bit(L, ob[16:80])


@njit(**JIT)
def quantize_q3_k_w(x, out, qw):
    """quantize_q3_K with quant_weights: quantize_row_q3_K_impl on every row."""
    npr = qw.size
    nbr = npr // QK_K
    L = np.empty(QK_K, np.int8)
    scales = np.empty(16, np.float32)
    weight = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    Ls = np.empty(16, np.int8)
    for ib in range(x.size // QK_K):
        xb = x[QK_K * ib:QK_K * (ib + 1)]
        ob = out[110 * ib:110 * (ib + 1)]
        qb = qw[QK_K * (ib % nbr):]
        sigma2 = _TWO * _sigma2(xb, 0, QK_K) / F32(QK_K)
        for j in range(16):
            sw[j] = _weights(xb[16 * j:16 * j + 16], qb[16 * j:16 * j + 16], sigma2, weight)
            scales[j] = make_qx_w(xb[16 * j:16 * j + 16], 4, L[16 * j:16 * j + 16], weight)
        sc = ob[96:108]
        sc[:] = 0
        d_block = make_qx_w(scales, 32, Ls, sw)
        for j in range(16):
            l = np.int64(Ls[j])
            if j < 8:
                sc[j] = l & 0xF
            else:
                sc[j - 8] = (sc[j - 8] | ((l & 0xF) << 4)) & 0xFF
            l >>= 4
            sc[j % 4 + 8] = (sc[j % 4 + 8] | (l << (2 * (j // 4)))) & 0xFF
        d = fp16_store(ob, 108, d_block)
        for j in range(16):
            s = np.int64(sc[j] & 0xF) if j < 8 else np.int64(sc[j - 8] >> 4)
            s = int8((s | (((np.int64(sc[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32)
            dj = d * F32(s)
            if dj == 0:
                continue
            for ii in range(16):
                L[16 * j + ii] = max(-4, min(3, nearest_int(xb[16 * j + ii] / dj))) + 4
        for m in range(32):
            h = 0
            for b in range(8):
                v = L[32 * b + m]
                if v > 3:
                    h |= 1 << b
                    L[32 * b + m] = v - 4
            ob[m] = h
        _pack_2bit(L, ob[32:96])


@njit(**JIT)
def _q45_k_w(x, out, qw, nmax):
    """quantize_row_q4_K_impl (nmax 15) / quantize_row_q5_K_impl (nmax 31) on every row."""
    ts = 144 if nmax == 15 else 176
    npr = qw.size
    nbr = npr // QK_K
    L = np.empty(QK_K, np.uint8)
    Laux = np.empty(32, np.uint8)
    Ls = np.empty(8, np.uint8)
    Lm = np.empty(8, np.uint8)
    weights = np.empty(32, np.float32)
    sw = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    scales = np.empty(8, np.float32)
    for ib in range(x.size // QK_K):
        xb = x[QK_K * ib:QK_K * (ib + 1)]
        ob = out[ts * ib:ts * (ib + 1)]
        qb = qw[QK_K * (ib % nbr):]
        sigma2 = _TWO * _sigma2(xb, 0, QK_K) / F32(QK_K)
        for j in range(8):
            sw[j] = _weights(xb[32 * j:32 * j + 32], qb[32 * j:32 * j + 32], sigma2, weights)
            scales[j], mins[j] = make_qkx3(xb[32 * j:32 * j + 32], nmax, weights, L[32 * j:32 * j + 32], Laux)
        d_block = make_qp(scales, 63, Ls, sw)
        m_block = make_qp(mins, 63, Lm, sw)
        q = ob[4:16]
        for j in range(8):
            ls = np.int64(Ls[j])
            lm = np.int64(Lm[j])
            if nmax == 31:  # only quantize_row_q5_K_impl clamps
                ls = min(63, ls)
                lm = min(63, lm)
            if j < 4:
                q[j] = ls
                q[j + 4] = lm
            else:
                q[j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
                q[j - 4] = (q[j - 4] | ((ls >> 4) << 6)) & 0xFF
                q[j] = (q[j] | ((lm >> 4) << 6)) & 0xFF
        d = fp16_store(ob, 0, d_block)
        dmin = fp16_store(ob, 2, m_block)
        for j in range(8):
            # get_scale_min_k4 (in int64: numba would unify uint8 and int64 branches to float64)
            if j < 4:
                sc = np.int64(q[j]) & 63
                m = np.int64(q[j + 4]) & 63
            else:
                sc = (np.int64(q[j + 4]) & 0xF) | ((np.int64(q[j - 4]) >> 6) << 4)
                m = (np.int64(q[j + 4]) >> 4) | ((np.int64(q[j]) >> 6) << 4)
            dj = d * F32(sc)
            if dj == 0:
                continue
            dm = dmin * F32(m)
            for ii in range(32):
                L[32 * j + ii] = max(0, min(nmax, nearest_int((xb[32 * j + ii] + dm) / dj)))
        if nmax == 15:
            for h in range(4):
                for l in range(32):
                    ob[16 + 32 * h + l] = L[64 * h + l] | (L[64 * h + 32 + l] << 4)
        else:
            _pack_q5(L, ob)


@njit(**JIT)
def quantize_q4_k_w(x, out, qw):
    """quantize_q4_K with quant_weights."""
    _q45_k_w(x, out, qw, 15)


@njit(**JIT)
def quantize_q5_k_w(x, out, qw):
    """quantize_q5_K with quant_weights."""
    _q45_k_w(x, out, qw, 31)


@njit(**JIT)
def quantize_q6_k_w(x, out, qw):
    """quantize_q6_K with quant_weights: quantize_row_q6_K_impl (make_qx_quants gets the raw
    weights, no sigma2 term), then the same scale packing as the reference."""
    nbr = qw.size // QK_K
    L = np.empty(QK_K, np.uint8)
    scales = np.empty(16, np.float32)
    for ib in range(x.size // QK_K):
        xb = x[QK_K * ib:QK_K * (ib + 1)]
        qb = qw[QK_K * (ib % nbr):]
        for j in range(16):
            scales[j] = make_qx_w(xb[16 * j:16 * j + 16], 32, L[16 * j:16 * j + 16], qb[16 * j:16 * j + 16])
        _q6_k_block(xb, out[210 * ib:210 * (ib + 1)], scales, L)


# --- 32-block legacy types --------------------------------------------------------------------------

@njit(**JIT)
def _legacy_w(x, out, qw, kind):
    """quantize_row_q4_0_impl (kind 0), q4_1 (1), q5_0 (2), q5_1 (3) on every row: sigma2 is the
    mean square of the whole row."""
    npr = qw.size
    ts = (18, 20, 22, 24)[kind]
    weight = np.empty(32, np.float32)
    Li = np.empty(32, np.int8)
    Lu = np.empty(32, np.uint8)
    Laux = np.empty(32, np.uint8)
    nb = npr // 32
    for r in range(x.size // npr):
        xr = x[npr * r:npr * (r + 1)]
        sigma2 = _sigma2(xr, 0, npr) / F32(npr)
        for ib in range(nb):
            xb = xr[32 * ib:32 * ib + 32]
            ob = out[(r * nb + ib) * ts:(r * nb + ib + 1) * ts]
            _weights(xb, qw[32 * ib:32 * ib + 32], sigma2, weight)
            if kind == 0 or kind == 2:
                d = make_qx_w(xb, 8 if kind == 0 else 16, Li, weight)
                fp16_store(ob, 0, d)
                for j in range(32):
                    Lu[j] = Li[j] & 0xFF
            else:
                d, the_min = make_qkx3(xb, 15 if kind == 1 else 31, weight, Lu, Laux)
                fp16_store(ob, 0, d)
                fp16_store(ob, 2, -the_min)
            qs = ts - 16
            if kind >= 2:
                qh = 0
                for j in range(16):
                    qh |= ((np.int64(Lu[j]) & 0x10) >> 4) << j
                    qh |= ((np.int64(Lu[j + 16]) & 0x10) >> 4) << (j + 16)
                for k in range(4):
                    ob[qs - 4 + k] = (qh >> (8 * k)) & 0xFF
            for j in range(16):
                ob[qs + j] = ((Lu[j] & 0xF) | ((Lu[j + 16] & 0xF) << 4)) & 0xFF if kind >= 2 else \
                    (Lu[j] | (Lu[j + 16] << 4)) & 0xFF


@njit(**JIT)
def quantize_q4_0_w(x, out, qw):
    _legacy_w(x, out, qw, 0)


@njit(**JIT)
def quantize_q4_1_w(x, out, qw):
    _legacy_w(x, out, qw, 1)


@njit(**JIT)
def quantize_q5_0_w(x, out, qw):
    _legacy_w(x, out, qw, 2)


@njit(**JIT)
def quantize_q5_1_w(x, out, qw):
    _legacy_w(x, out, qw, 3)


# --- IQ4_NL / IQ4_XS --------------------------------------------------------------------------------

@njit(**JIT)
def best_index_int8(values, x):
    """best_index_int8(16, values, x): the nearest level by bisection, ties to the upper one."""
    n = values.size
    if x <= F32(values[0]):
        return 0
    if x >= F32(values[n - 1]):
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < F32(values[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - F32(values[mu - 1]) < F32(values[mu]) - x else mu


@njit(**JIT)
def _iq4_impl(sbs, x, ob, qoff, qw, has_qw, scales, weight, L, values):
    """quantize_row_iq4_nl_impl(super_block_size=sbs, block_size=32, ..., ntry=7) for one super-block
    ``x`` into ``ob`` (IQ4_NL: sbs 32, d + 16 bytes; IQ4_XS: sbs 256, d, scales_h, scales_l, qs)."""
    ntry = 7
    sigma2 = _sigma2(x, 0, sbs)
    sigma2 *= _TWO / F32(sbs)
    q4 = ob[qoff:qoff + sbs // 2]
    q4[:] = 0
    fp16_store(ob, 0, _ZERO)
    v0 = F32(values[0])
    max_scale = _ZERO
    amax_scale = _ZERO
    nblk = sbs // 32
    for ib in range(nblk):
        xb = x[32 * ib:32 * ib + 32]
        if has_qw:
            _weights(xb, qw[32 * ib:32 * ib + 32], sigma2, weight)
        else:
            for j in range(32):
                weight[j] = xb[j] * xb[j]
        amax = _ZERO
        mx = _ZERO
        for j in range(32):
            ax = abs(xb[j])
            if ax > amax:
                amax = ax
                mx = xb[j]
        if amax < GROUP_MAX_EPS:
            scales[ib] = _ZERO
            continue
        d = -mx / v0  # ntry > 0
        id_ = _ONE / d
        sumqx = _ZERO
        sumq2 = _ZERO
        for j in range(32):
            al = id_ * xb[j]
            l = best_index_int8(values, al)
            L[32 * ib + j] = l
            q = F32(values[l])
            w = weight[j]
            sumqx += w * q * xb[j]
            sumq2 += w * q * q
        d = sumqx / sumq2 if sumq2 > 0 else _ZERO
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            id_ = F32(itry + np.int64(values[0])) / mx
            sumqx = _ZERO
            sumq2 = _ZERO
            for j in range(32):
                al = id_ * xb[j]
                l = best_index_int8(values, al)
                q = F32(values[l])
                w = weight[j]
                sumqx += w * q * xb[j]
                sumq2 += w * q * q
            if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
        scales[ib] = d
        abs_d = abs(d)
        if abs_d > amax_scale:
            amax_scale = abs_d
            max_scale = d
    if nblk > 1:
        scales_h = 0
        d = -max_scale / F32(32)
        fp16_store(ob, 0, d)
        id_ = _ONE / d if d != 0 else _ZERO
        for ib in range(nblk):
            l = max(-32, min(31, nearest_int(id_ * scales[ib])))
            dl = d * F32(l)
            idl = _ONE / dl if dl != 0 else _ZERO
            for j in range(32):
                L[32 * ib + j] = best_index_int8(values, idl * x[32 * ib + j])
            l += 32
            l_l = l & 0xF
            l_h = (l >> 4) & 0xFF
            if ib % 2 == 0:
                ob[4 + ib // 2] = l_l
            else:
                ob[4 + ib // 2] = (ob[4 + ib // 2] | (l_l << 4)) & 0xFF
            scales_h |= l_h << (2 * (ib % 8))
        ob[2] = scales_h & 0xFF
        ob[3] = (scales_h >> 8) & 0xFF
    else:
        fp16_store(ob, 0, scales[0])
        s0 = scales[0]
        id_ = _ONE / s0 if s0 != 0 else _ZERO
        for j in range(sbs):
            L[j] = best_index_int8(values, id_ * x[j])
    for i in range(sbs // 32):
        for j in range(16):
            q4[16 * i + j] = (L[32 * i + j] | (L[32 * i + 16 + j] << 4)) & 0xFF


@njit(**JIT)
def _iq4(x, out, qw, sbs, ts, qoff):
    has_qw = qw.size > 0
    values = KVALUES_IQ4NL
    L = np.empty(sbs, np.uint8)
    weight = np.empty(32, np.float32)
    scales = np.empty(sbs // 32, np.float32)
    npr = qw.size if has_qw else sbs
    nbr = npr // sbs
    for ib in range(x.size // sbs):
        qb = qw[sbs * (ib % nbr):] if has_qw else qw
        _iq4_impl(sbs, x[sbs * ib:sbs * (ib + 1)], out[ts * ib:ts * (ib + 1)], qoff, qb, has_qw, scales,
                  weight, L, values)


@njit(**JIT)
def quantize_iq4_nl(x, out, qw):
    """quantize_iq4_nl (with or without quant_weights): per 32 values an fp16 d and 16 bytes."""
    _iq4(x, out, qw, 32, 18, 2)


@njit(**JIT)
def quantize_iq4_xs(x, out, qw):
    """quantize_iq4_xs (with or without quant_weights): d, 8 6-bit scales (scales_h/scales_l), 128 bytes."""
    _iq4(x, out, qw, QK_K, 136, 8)

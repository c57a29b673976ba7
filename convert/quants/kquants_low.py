"""Q2_K and Q3_K (numba kernels), byte-identical to ggml's ``quantize_row_q{2,3}_K_ref``.

Same approach and kernel signature as :mod:`.kquants`: C's float32 operations in C's order.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .ggml_float import F32, GROUP_MAX_EPS, JIT, fp16_store, int8, nearest_int
from .kquants import LANES, QK_K, from_lanes, lane_absmax, lane_scratch, make_qkx2_lanes, to_lanes

_ZERO = F32(0.0)
_ONE = F32(1.0)
_Q2_RMIN = F32(-0.5)  # make_qkx2_quants(16, 3, ..., -0.5f, 0.1f, 15, true) in quantize_row_q2_K_ref
_Q2_RDELTA = F32(0.1)


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
    xt, wt, Lt, Laux, scales, mins, st, flags = lane_scratch(16, LANES)
    L = np.empty(QK_K, np.uint8)
    nb = x.size // QK_K
    for ib0 in range(0, nb, LANES // 16):
        to_lanes(x, ib0, xt)
        for i in range(16):
            for s in range(LANES):
                wt[i, s] = abs(xt[i, s])
        make_qkx2_lanes(xt, wt, Lt, Laux, scales, mins, st, flags, 3, _Q2_RMIN, _Q2_RDELTA, 15, True)
        for k in range(min(LANES // 16, nb - ib0)):
            ib = ib0 + k
            from_lanes(Lt, k, L)
            _q2_k_block(x[QK_K * ib:QK_K * (ib + 1)], out[84 * ib:84 * (ib + 1)],
                        scales[16 * k:16 * k + 16], mins[16 * k:16 * k + 16], L)


@njit(**JIT)
def _q2_k_block(xb, ob, scales, mins, L):
    """quantize_row_q2_K_ref for one super-block after the searches."""
    q4scale = F32(15)
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(16):
        if scales[j] > max_scale:  # noqa: PLR1730
            max_scale = scales[j]
        if mins[j] > max_min:  # noqa: PLR1730
            max_min = mins[j]
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
def make_q3_lanes(xt, nmax, L, scale, st):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on every column of ``xt`` (n, S): levels + nmax
    into ``L`` (int8), scales into ``scale``; ``st`` is float32 scratch (>= 4, S).

    Within a lane the refinement visits the elements one after the other and each accepted change
    feeds the next, as in C. C stops a lane after a pass that changed nothing; such a pass leaves
    its state as it was, so running further passes on it (while other lanes still change) repeats
    the same no-op and gives the same result.
    """
    n, S = xt.shape
    amax, vmax, sumlx, suml2 = st[0], st[1], st[2], st[3]
    lane_absmax(xt, amax, vmax)
    for s in range(S):
        vmax[s] = F32(-nmax) / vmax[s]  # now iscale
        sumlx[s] = _ZERO
        suml2[s] = _ZERO
    for i in range(n):
        for s in range(S):
            v = xt[i, s]
            l = max(-nmax, min(nmax - 1, nearest_int(vmax[s] * v)))
            L[i, s] = l
            w = v * v
            fl = F32(l)
            sumlx[s] += w * v * fl
            suml2[s] += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            for s in range(S):
                v = xt[i, s]
                w = v * v
                fli = F32(L[i, s])
                slx0 = sumlx[s] - w * v * fli
                sl2 = suml2[s] - w * fli * fli
                new_l = max(-nmax, min(nmax - 1, nearest_int(v * sl2 / slx0)))
                fl = F32(new_l)
                slx = slx0 + w * v * fl
                sl2 = sl2 + w * fl * fl
                # C: if (slx > 0) { ... if (new_l != L[i]) { ... if (sl2 > 0 && ...) accept } }
                # (all of it computed, then kept or not: no branches in the lane loop)
                acc = ((slx0 > 0) & (new_l != L[i, s]) & (sl2 > 0)
                       & (slx * slx * suml2[s] > sumlx[s] * sumlx[s] * sl2))
                L[i, s] = new_l if acc else L[i, s]
                sumlx[s] = slx if acc else sumlx[s]
                suml2[s] = sl2 if acc else suml2[s]
                n_changed += acc
        if n_changed == 0:
            break
    for s in range(S):
        zero = amax[s] < GROUP_MAX_EPS  # C returns early: all zero
        scale[s] = _ZERO if zero or not suml2[s] > 0 else sumlx[s] / suml2[s]
        for i in range(n):
            L[i, s] = 0 if zero else L[i, s] + nmax


@njit(**JIT)
def quantize_q3_k(x, out):
    """quantize_row_q3_K_ref: 32 bytes high-bit mask, 64 bytes of low 2 bits, 12 scale bytes, d."""
    xt, _, _, _, scales, _, st, _ = lane_scratch(16, LANES)
    Lt = np.empty((16, LANES), np.int8)
    L = np.empty(QK_K, np.int8)
    lv = np.empty(16, np.int64)
    nb = x.size // QK_K
    for ib0 in range(0, nb, LANES // 16):
        to_lanes(x, ib0, xt)
        make_q3_lanes(xt, 4, Lt, scales, st)
        for k in range(min(LANES // 16, nb - ib0)):
            ib = ib0 + k
            from_lanes(Lt, k, L)
            _q3_k_block(x[QK_K * ib:QK_K * (ib + 1)], out[110 * ib:110 * (ib + 1)],
                        scales[16 * k:16 * k + 16], L, lv)


@njit(**JIT)
def _q3_k_block(xb, ob, scales, L, lv):
    """quantize_row_q3_K_ref for one super-block after the searches (``lv``: int64 scratch (16))."""
    max_scale = _ZERO
    amax = _ZERO
    for j in range(16):
        a = abs(scales[j])
        if a > amax:
            amax = a
            max_scale = scales[j]
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
    # hmask: bit b of byte m is the high bit of level 32*b + m, which is then dropped
    for m in range(32):
        h = 0
        for b in range(8):
            h |= (L[32 * b + m] >> 2) << b
            L[32 * b + m] &= 3
        ob[m] = h
    _pack_2bit(L, ob[32:96])

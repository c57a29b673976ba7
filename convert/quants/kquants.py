"""Q4_K, Q5_K and Q6_K (numba kernels), byte-identical to ggml's ``quantize_row_q{4,5,6}_K_ref``.

Each function mirrors its C namesake in ggml/src/ggml-quants.c statement by statement, in float32
and in C's order (see :mod:`.ggml_float` for why that is exact and for the typing traps). Kernel
signature: ``(x, out)``, ``x`` contiguous float32 holding whole 256-value super-blocks, ``out`` the
contiguous uint8 buffer for them. Scope: no importance matrix (llama-quantize without ``--imatrix``
calls exactly these references).

Why *lanes*: the scale searches (make_qkx2_quants, make_qx_quants) are chains of sequential float32
sums, one chain per sub-block; C runs one sub-block after the other and waits on each add. The
sub-blocks of a super-block are independent, so the ``*_lanes`` functions run all of them at once:
arrays are ``(n, S)``, one column (lane) per sub-block, loops go ``for i: for s:``. Every lane still
does exactly C's operations in C's order (its sums add element 0, 1, 2, ... in turn), so the bits are
the same; only independent work is interleaved, which lets the CPU overlap the chains and LLVM
vectorise across lanes. Branches that only skip work become a per-lane choice of result.
LLVM's vectorised loops pay off from 32 lanes on, so the kernels take the sub-blocks of several
super-blocks at once (``LANES`` columns; a last, partial group repeats its final super-block in the
unused lanes and ignores their results).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .ggml_float import F32, GROUP_MAX_EPS, JIT, fp16_store, int8, nearest_int

QK_K = 256
_ZERO = F32(0.0)
_ONE = F32(1.0)
_TENTH = F32(0.1)  # the 0.1f of the scale searches
_RMIN_Q4 = F32(-1.0)
_RMIN_Q5 = F32(-0.5)
_N_STATE = 12  # rows of per-lane float32 state the *_lanes functions use (see lane_scratch)
LANES = 32  # sub-blocks searched at once


@njit(**JIT)
def lane_scratch(n, S):
    """(xt, wt, Lt, Laux, scales, mins, state, flags): the per-call scratch of a lanes kernel."""
    return (np.empty((n, S), np.float32), np.empty((n, S), np.float32), np.empty((n, S), np.uint8),
            np.empty((n, S), np.uint8), np.empty(S, np.float32), np.empty(S, np.float32),
            np.empty((_N_STATE, S), np.float32), np.empty(S, np.bool_))


@njit(**JIT)
def to_lanes(x, ib0, xt):
    """The sub-blocks (``n`` values each) of super-blocks ``ib0, ib0 + 1, ...`` of ``x`` into the
    columns of ``xt`` (n, S), in order; past the last super-block the last one is repeated."""
    n, S = xt.shape
    last = x.size // QK_K - 1
    per = QK_K // n
    for k in range(S // per):
        xb = x[QK_K * min(ib0 + k, last):]
        for j in range(per):
            for i in range(n):
                xt[i, per * k + j] = xb[n * j + i]


@njit(**JIT)
def from_lanes(Lt, k, L):
    """Levels of super-block ``k`` of a group (columns ``k*per ...``) back into C's order in ``L``."""
    n = Lt.shape[0]
    per = QK_K // n
    for j in range(per):
        for i in range(n):
            L[n * j + i] = Lt[i, per * k + j]


@njit(**JIT)
def make_qkx2_lanes(xt, wt, L, Laux, scale, the_min, st, better, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants on every column of ``xt`` (n, S) with weights ``wt``: levels into ``L``,
    results into ``scale`` and ``the_min`` (per column). ``rmin``/``rdelta`` must be float32.

    As in C, ``min`` is updated inside the step loop, so later steps of a lane quantize around the
    best minimum that lane has found so far. ``nstep >= 1`` (every caller).
    """
    n, S = xt.shape
    mn, mx, mn0, sum_w, sum_x, isc = st[0], st[1], st[2], st[3], st[4], st[5]
    best_error, sum_l, sum_l2, sum_xl, this_scale, this_min = st[6], st[7], st[8], st[9], st[10], st[11]
    for s in range(S):
        mn[s] = xt[0, s]
        mx[s] = xt[0, s]
        sum_w[s] = wt[0, s]
        sum_x[s] = sum_w[s] * xt[0, s]
    for i in range(1, n):
        for s in range(S):
            v = xt[i, s]
            if v < mn[s]:  # noqa: PLR1730 (C's compares, see ggml_float)
                mn[s] = v
            if v > mx[s]:  # noqa: PLR1730
                mx[s] = v
            w = wt[i, s]
            sum_w[s] += w
            sum_x[s] += w * v
    fnmax = F32(nmax)
    for s in range(S):
        if mn[s] > 0:
            mn[s] = _ZERO
        mn0[s] = mn[s]  # C returns here if max == min: settled at the end
        isc[s] = fnmax / (mx[s] - mn[s])
        scale[s] = _ONE / isc[s]
        best_error[s] = _ZERO
    for i in range(n):
        for s in range(S):
            v = xt[i, s]
            l = max(0, min(nmax, nearest_int(isc[s] * (v - mn[s]))))
            L[i, s] = l
            diff = scale[s] * F32(l) + mn[s] - v
            diff = abs(diff) if use_mad else diff * diff
            best_error[s] += wt[i, s] * diff
    for step in range(nstep + 1):
        num = rmin + rdelta * F32(step) + fnmax
        for s in range(S):
            isc[s] = num / (mx[s] - mn[s])
            sum_l[s] = _ZERO
            sum_l2[s] = _ZERO
            sum_xl[s] = _ZERO
        for i in range(n):
            for s in range(S):
                v = xt[i, s]
                l = max(0, min(nmax, nearest_int(isc[s] * (v - mn[s]))))
                Laux[i, s] = l
                w = wt[i, s]
                fl = F32(l)
                sum_l[s] += w * fl
                sum_l2[s] += w * fl * fl
                sum_xl[s] += w * fl * v
        for s in range(S):
            D = sum_w[s] * sum_l2[s] - sum_l[s] * sum_l[s]
            ts = (sum_w[s] * sum_xl[s] - sum_x[s] * sum_l[s]) / D
            tm = (sum_l2[s] * sum_x[s] - sum_l[s] * sum_xl[s]) / D
            if tm > 0:
                tm = _ZERO
                ts = sum_xl[s] / sum_l2[s]
            this_scale[s] = ts
            this_min[s] = tm
            better[s] = D > 0  # C computes the error only then
            sum_l[s] = _ZERO  # reused as cur_error
        for i in range(n):
            for s in range(S):
                diff = this_scale[s] * F32(Laux[i, s]) + this_min[s] - xt[i, s]
                diff = abs(diff) if use_mad else diff * diff
                sum_l[s] += wt[i, s] * diff
        n_better = 0
        for s in range(S):
            if better[s] and sum_l[s] < best_error[s]:
                best_error[s] = sum_l[s]
                scale[s] = this_scale[s]
                mn[s] = this_min[s]
                n_better += 1
            else:
                better[s] = False
        if n_better:
            for i in range(n):
                for s in range(S):
                    if better[s]:
                        L[i, s] = Laux[i, s]
    for s in range(S):
        if mx[s] == mn0[s]:  # the early return: all levels 0, scale 0
            scale[s] = _ZERO
            the_min[s] = -mn0[s]
            for i in range(n):
                L[i, s] = 0
        else:
            the_min[s] = -mn[s]


@njit(**JIT)
def _qx_sums(xt, isc, nmax, sumlx, suml2):
    """The two sums of one make_qx_quants try (rmse_type 1: w = x*x), per lane, in C's order."""
    n, S = xt.shape
    for s in range(S):
        sumlx[s] = _ZERO
        suml2[s] = _ZERO
    for i in range(n):
        for s in range(S):
            v = xt[i, s]
            l = max(-nmax, min(nmax - 1, nearest_int(isc[s] * v)))
            w = v * v
            fl = F32(l)
            sumlx[s] += w * v * fl
            suml2[s] += w * fl * fl


@njit(**JIT)
def lane_absmax(xt, amax, vmax):
    """Per column of ``xt`` (n, S): the largest |x| into ``amax`` and the signed x it came from into
    ``vmax`` — the first one in C order on ties (``if (ax > amax)``), as make_qx_quants and
    make_q3_quants do."""
    n, S = xt.shape
    for s in range(S):
        amax[s] = _ZERO
        vmax[s] = _ZERO
    for i in range(n):
        for s in range(S):
            a = abs(xt[i, s])
            if a > amax[s]:
                amax[s] = a
                vmax[s] = xt[i, s]


@njit(**JIT)
def make_qx_lanes(xt, nmax, L, scale, st):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) on every column of ``xt`` (n, S):
    levels + nmax into ``L``, scales into ``scale``.

    The 19 tries differ only in iscale; C keeps the levels of the last improving try, recomputed
    here once from that try's iscale (the same float operations, so the same levels).
    """
    n, S = xt.shape
    amax, vmax, sumlx, suml2, best, best_isc, isc = st[0], st[1], st[2], st[3], st[4], st[5], st[6]
    lane_absmax(xt, amax, vmax)
    for s in range(S):
        isc[s] = F32(-nmax) / vmax[s]
    _qx_sums(xt, isc, nmax, sumlx, suml2)
    for s in range(S):
        sc = sumlx[s] / suml2[s] if suml2[s] != 0 else _ZERO
        scale[s] = sc
        best[s] = sc * sumlx[s]
        best_isc[s] = isc[s]
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(F32(nmax) + _TENTH * F32(step))
        for s in range(S):
            isc[s] = num / vmax[s]
        _qx_sums(xt, isc, nmax, sumlx, suml2)
        for s in range(S):
            if suml2[s] > 0 and sumlx[s] * sumlx[s] > best[s] * suml2[s]:
                scale[s] = sumlx[s] / suml2[s]
                best[s] = scale[s] * sumlx[s]
                best_isc[s] = isc[s]
    for i in range(n):
        for s in range(S):
            L[i, s] = nmax + max(-nmax, min(nmax - 1, nearest_int(best_isc[s] * xt[i, s])))
    for s in range(S):
        if amax[s] < GROUP_MAX_EPS:  # C returns early: all zero
            scale[s] = _ZERO
            for i in range(n):
                L[i, s] = 0


@njit(**JIT)
def _q45_k(x, out, nmax, rmin, nstep):
    """quantize_row_q4_K_ref (nmax 15) / quantize_row_q5_K_ref (nmax 31)."""
    ts = 144 if nmax == 15 else 176
    xt, wt, Lt, Laux, scales, mins, st, flags = lane_scratch(32, LANES)
    L = np.empty(QK_K, np.uint8)
    ls = np.empty(8, np.int64)
    lm = np.empty(8, np.int64)
    nb = x.size // QK_K
    for ib0 in range(0, nb, LANES // 8):
        to_lanes(x, ib0, xt)
        sum_x2 = st[0]
        for s in range(LANES):
            sum_x2[s] = _ZERO
        for l in range(32):
            for s in range(LANES):
                sum_x2[s] += xt[l, s] * xt[l, s]
        for s in range(LANES):
            av_x = np.sqrt(sum_x2[s] / F32(32))
            for l in range(32):
                wt[l, s] = av_x + abs(xt[l, s])
        make_qkx2_lanes(xt, wt, Lt, Laux, scales, mins, st, flags, nmax, rmin, _TENTH, nstep, False)
        for k in range(min(LANES // 8, nb - ib0)):
            ib = ib0 + k
            xb = x[QK_K * ib:QK_K * (ib + 1)]
            ob = out[ts * ib:ts * (ib + 1)]
            from_lanes(Lt, k, L)
            _q45_k_scales(xb, ob, scales[8 * k:8 * k + 8], mins[8 * k:8 * k + 8], nmax, L, ls, lm)
            if nmax == 15:
                for h in range(4):
                    for l in range(32):
                        ob[16 + 32 * h + l] = L[64 * h + l] | (L[64 * h + 32 + l] << 4)
            else:
                _pack_q5(L, ob)


@njit(**JIT)
def _q45_k_scales(xb, ob, scales, mins, nmax, L, ls, lm):
    """The rest of quantize_row_q4_K_ref / q5_K_ref for one super-block after the searches: d, dmin
    and the 12 packed 6-bit scale/min bytes into ``ob[0:16]``; the final levels into ``L``."""
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(8):
        if scales[j] > max_scale:  # noqa: PLR1730
            max_scale = scales[j]
        if mins[j] > max_min:  # noqa: PLR1730
            max_min = mins[j]
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
def _pack_q5(L, ob):
    """Q5_K's 32 bytes of 5th bits and 128 bytes of low nibbles (C: ``if (l > 15) { l -= 16;
    qh[j] |= m; }`` for levels 0..31, i.e. bit 4 moves to qh)."""
    for j in range(32):
        h = 0
        for k in range(4):
            l1 = L[64 * k + j]
            l2 = L[64 * k + 32 + j]
            h |= ((l1 >> 4) << (2 * k)) | ((l2 >> 4) << (2 * k + 1))
            ob[48 + 32 * k + j] = (l1 & 0xF) | ((l2 & 0xF) << 4)
        ob[16 + j] = h


@njit(**JIT)
def quantize_q4_k(x, out):
    """quantize_row_q4_K_ref: d, dmin (fp16), 12 scale bytes, 128 bytes of 4-bit levels."""
    _q45_k(x, out, 15, _RMIN_Q4, 20)


@njit(**JIT)
def quantize_q5_k(x, out):
    """quantize_row_q5_K_ref: d, dmin, 12 scale bytes, 32 bytes of 5th bits, 128 of low nibbles."""
    _q45_k(x, out, 31, _RMIN_Q5, 15)


@njit(**JIT)
def quantize_q6_k(x, out):
    """quantize_row_q6_K_ref: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, d."""
    xt, _, Lt, _, scales, _, st, _ = lane_scratch(16, LANES)
    L = np.empty(QK_K, np.uint8)
    nb = x.size // QK_K
    for ib0 in range(0, nb, LANES // 16):
        to_lanes(x, ib0, xt)
        make_qx_lanes(xt, 32, Lt, scales, st)
        for k in range(min(LANES // 16, nb - ib0)):
            ib = ib0 + k
            from_lanes(Lt, k, L)
            _q6_k_block(x[QK_K * ib:QK_K * (ib + 1)], out[210 * ib:210 * (ib + 1)],
                        scales[16 * k:16 * k + 16], L)


@njit(**JIT)
def _q6_k_block(xb, ob, scales, L):
    """quantize_row_q6_K_ref for one super-block after the searches."""
    max_scale = _ZERO
    max_abs_scale = _ZERO
    for j in range(16):
        a = abs(scales[j])
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = scales[j]
    if max_abs_scale < GROUP_MAX_EPS:
        ob[:] = 0  # memset; d = fp16(0) is 0 as well
        return
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

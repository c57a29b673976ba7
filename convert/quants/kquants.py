"""Q4_K, Q5_K and Q6_K quantizers, byte-identical to ggml's ``quantize_row_q{4,5,6}_K_ref``.

Each function mirrors its C reference in ggml/src/ggml-quants.c operation by operation (same float32
operations in the same order; see :mod:`.ggml_float` for why that is exact). The C code loops block by
block; here every loop over blocks becomes a numpy operation over all the sub-blocks of a chunk at
once, laid out as columns ``(n, S)``, and only the in-block loops (search steps, and the sequential
sums over a sub-block's elements) remain Python loops.

Input of every ``quantize_*`` here: float32 ``(n_blocks, 256)``; output: uint8 ``(n_blocks, type_size)``.
Scope: no importance matrix (llama-quantize without ``--imatrix`` calls exactly these references).
"""
from __future__ import annotations

import numpy as np

from .ggml_float import F32, fp16_round, nearest_int, seq_sum, seq_sum_from_first

QK_K = 256
GROUP_MAX_EPS = F32(1e-15)
_SAFE_RINT = F32(4.0e6)  # below 2**22, where nearest_int == round-half-even


def columns(blocks: np.ndarray, n: int) -> np.ndarray:
    """(B, 256) super-blocks -> (n, S) sub-block columns, S = B * 256 / n, C-contiguous."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def final_levels(x: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int,
                 Lsearch: np.ndarray, offset: int = 0) -> np.ndarray:
    """The last pass of every K-quant reference, over columns (n, S), returned as uint8 (B, 256).

    Where the sub-block's quantized scale ``d`` is non-zero: ``MAX(lo, MIN(hi, nearest_int((x + dm)/d)))
    + offset`` (``dm`` None: ``x/d``); where it is zero C skips the sub-block and keeps the levels
    its search found (``Lsearch``, already offset).
    """
    d = d.reshape(-1)
    v = (x + dm.reshape(-1)) / d if dm is not None else x / d
    v = _levels(v, lo, hi, False)
    if offset:
        v += F32(offset)
    L = np.where(d != 0, v, Lsearch).astype(np.uint8)
    return L.T.reshape(-1, QK_K)


def running_max(v: np.ndarray) -> np.ndarray:
    """``float m = 0; for (j) if (v[j] > m) m = v[j];`` over the last axis (NaN never wins, +0 if none)."""
    m = np.max(np.where(v > 0, v, F32(0)), axis=-1)
    return m.astype(F32, copy=False)


def first_abs_max(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``if (fabsf(v[i]) > amax) { amax = fabsf(v[i]); max = v[i]; }`` from amax = max = 0, over axis 0.

    Returns (amax, max): the first element of largest magnitude wins, NaN never does.
    """
    amax = np.zeros(v.shape[1:], dtype=F32)
    vmax = np.zeros(v.shape[1:], dtype=F32)
    for row in v:
        a = np.abs(row)
        upd = a > amax
        np.copyto(amax, a, where=upd)
        np.copyto(vmax, row, where=upd)
    return amax, vmax


def first_abs_max_finite(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`first_abs_max` for finite columns (n, S), with whole-array reductions.

    The extreme's magnitude is the column max of |x|; only its sign needs the scan order, and only
    where both +amax and -amax occur.
    """
    amax = np.maximum.reduce(np.abs(x), axis=0)
    pos = np.logical_or.reduce(x == amax, axis=0)
    vmax = np.where(pos, amax, -amax)
    tie = pos & np.logical_or.reduce(x == -amax, axis=0)
    if tie.any():
        vmax[tie] = first_abs_max(x[:, tie])[1]
    return amax, vmax


def _levels(v: np.ndarray, lo: float | None, hi: float | None, fast: bool) -> np.ndarray:
    """In place: ``MAX(lo, MIN(hi, nearest_int(v)))`` as float32 (``None``: that clamp is a no-op).

    ``fast`` (the caller proved |v| < 2**22, where nearest_int is round-half-even) uses ``np.rint``;
    otherwise the exact bit trick of :func:`nearest_int` is used.
    """
    if fast:
        np.rint(v, out=v)
    else:
        np.copyto(v, nearest_int(v), casting="unsafe")
        lo = -np.inf if lo is None else lo
        hi = np.inf if hi is None else hi
    if lo is not None and hi is not None:
        np.clip(v, F32(lo), F32(hi), out=v)
    elif hi is not None:
        np.minimum(v, F32(hi), out=v)
    elif lo is not None:
        np.maximum(v, F32(lo), out=v)
    return v


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirror of ``make_qkx2_quants`` over columns: x, w are (n, S) float32.

    Returns (scale, the_min, L) with L the (n, S) levels as float32. As in C, ``min`` is updated
    inside the step loop, so later steps quantize around the best minimum found so far.
    """
    hi = F32(nmax)
    with np.errstate(all="ignore"):
        sum_w = seq_sum_from_first(w)
        sum_x = seq_sum_from_first(w * x)
        xmin = np.minimum.reduce(x, axis=0)
        xmax = np.maximum.reduce(x, axis=0)
        mn = np.where(xmin > 0, F32(0), xmin)
        flat = xmax == mn  # C returns early for these; their columns are overwritten at the end
        keep = ~flat
        L = np.empty_like(x)
        t = np.empty_like(x)
        wl = np.empty_like(x)

        def around(m):
            """(max - min, reach of |x - min|, no clamp needed) for the current min m per column."""
            rng = np.where(keep, xmax - m, F32(1))  # flat columns: any finite value will do
            reach = np.where(keep, np.maximum(np.abs(xmax - m), np.abs(xmin - m)), F32(0))
            return rng, reach, bool(np.all(rng > 0)) and not bool(np.any(m > xmin))

        def levels(num, m, rng, reach, inside):
            # C: MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))), iscale = num/(max - min).
            # |v| <= iscale*reach below 2**22: rint is exact. 'inside' (min <= x <= max, max > min
            # everywhere) gives 0 <= v <= num*(1+eps)**2: the clamps are no-ops unless num >= nmax+.5
            iscale = num / rng
            np.subtract(x, m, out=t)
            np.multiply(t, iscale, out=L)
            fast = bool(np.max(iscale * reach) < _SAFE_RINT)
            if fast and inside:
                _levels(L, None, hi if np.max(num) >= hi + F32(0.49) else None, True)
            else:
                _levels(L, 0.0, hi, fast)
            return iscale

        rng, reach, inside = around(mn)
        iscale = levels(hi, mn, rng, reach, inside)
        scale = F32(1) / iscale
        np.multiply(L, scale, out=t)
        np.add(t, mn, out=t)
        np.subtract(t, x, out=t)
        _err_term(t, w, use_mad)
        best_error = seq_sum(t)
        best_step = np.zeros(x.shape[1], dtype=np.int8)  # 0: the initial levels, k: step k - 1
        best_m = mn

        nums = [F32(rmin) + F32(rdelta) * F32(step) + F32(nmax) for step in range(nstep + 1)]
        for k, num in enumerate(nums, start=1):
            levels(num, mn, rng, reach, inside)
            np.multiply(w, L, out=wl)
            sum_l = seq_sum(wl)
            np.multiply(wl, L, out=t)
            sum_l2 = seq_sum(t)
            np.multiply(wl, x, out=t)
            sum_xl = seq_sum(t)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            if pos.any():
                this_min = np.where(pos, F32(0), this_min)
                this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            np.multiply(L, this_scale, out=t)
            np.add(t, this_min, out=t)
            np.subtract(t, x, out=t)
            _err_term(t, w, use_mad)
            cur_error = seq_sum(t)
            better = (D > 0) & (cur_error < best_error)
            if better.any():
                best_error = np.where(better, cur_error, best_error)
                scale = np.where(better, this_scale, scale)
                np.maximum(best_step, better.view(np.int8) * np.int8(k), out=best_step)
                best_m = np.where(better, mn, best_m)  # the min these levels were made with
                mn = np.where(better, this_min, mn)
                rng, reach, inside = around(mn)

        # the chosen levels again (same float operations, so the same values)
        best_num = np.asarray([hi] + nums, dtype=F32)[best_step]
        rng, reach, inside = around(best_m)
        levels(best_num, best_m, rng, reach, inside)
        L[:, flat] = 0
        scale = np.where(flat, F32(0), scale)
        the_min = -mn
    return scale.astype(F32, copy=False), the_min.astype(F32, copy=False), L


def _err_term(diff: np.ndarray, w: np.ndarray, use_mad: bool) -> None:
    """In place: ``w * (use_mad ? fabsf(diff) : diff*diff)``."""
    if use_mad:
        np.abs(diff, out=diff)
    else:
        np.multiply(diff, diff, out=diff)
    np.multiply(w, diff, out=diff)


def make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Mirror of ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`` over columns (n, S).

    Returns (scale, L) with L = level + nmax as float32 (0 for all-zero columns, as in C).
    """
    with np.errstate(all="ignore"):
        amax, vmax = first_abs_max_finite(x)
        zero = amax < GROUP_MAX_EPS
        vmax = np.where(zero, F32(1), vmax)
        w = x * x
        wx = w * x
        lo, hi = -float(nmax), float(nmax - 1)
        L = np.empty_like(x)
        t = np.empty_like(x)

        def sums(iscale):
            # |x| <= |max| >= 1e-15 in a non-zero column, so |iscale*x| <= nmax + 1: rint is exact
            np.multiply(x, iscale, out=L)
            _levels(L, lo, hi, True)
            np.multiply(wx, L, out=t)
            sumlx = seq_sum(t)
            np.multiply(w, L, out=t)
            np.multiply(t, L, out=t)
            return sumlx, seq_sum(t)

        # numerators of iscale: C's first try, then is = -9..9 without 0
        nums = [F32(-nmax)] + [-(F32(nmax) + F32(0.1) * F32(i)) for i in range(-9, 10) if i]
        sumlx, suml2 = sums(nums[0] / vmax)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        best_k = np.zeros(x.shape[1], dtype=np.int8)
        for k in range(1, len(nums)):
            sumlx, suml2 = sums(nums[k] / vmax)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if better.any():
                scale = np.where(better, sumlx / suml2, scale)
                best = np.where(better, scale * sumlx, best)
                np.maximum(best_k, better.view(np.int8) * np.int8(k), out=best_k)  # later k wins
        best_iscale = np.asarray(nums, dtype=F32)[best_k] / vmax
        np.multiply(x, best_iscale, out=L)
        _levels(L, lo, hi, True)
        L += F32(nmax)
        L[:, zero] = 0
        scale = np.where(zero, F32(0), scale)
    return scale.astype(F32, copy=False), L


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12-byte 6-bit scale/min packing of Q4_K/Q5_K (inverse of ``get_scale_min_k4``)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros(ls.shape[:-1] + (12,), dtype=np.uint8)
    out[..., 0:4] = ls[..., 0:4] | ((ls[..., 4:8] >> 4) << 6)
    out[..., 4:8] = lm[..., 0:4] | ((lm[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (ls[..., 4:8] & 0xF) | ((lm[..., 4:8] & 0xF) << 4)
    return out


def _qkx_superblock(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared body of quantize_row_q4_K_ref / quantize_row_q5_K_ref up to the final levels."""
    B = blocks.shape[0]
    x = columns(blocks, 32)
    with np.errstate(all="ignore"):
        sum_x2 = seq_sum(x * x)
        av_x = np.sqrt(sum_x2 / F32(32))
        w = av_x + np.abs(x)
        scales, mins, Lsearch = make_qkx2_quants(x, w, nmax, rmin, 0.1, nstep, False)
        del w
        scales = scales.reshape(B, 8)
        mins = mins.reshape(B, 8)
        max_scale = running_max(scales)
        max_min = running_max(mins)
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
        lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
        d_bits, d = fp16_round(max_scale / F32(63))
        dmin_bits, dmin = fp16_round(max_min / F32(63))
        dj = d[:, None] * ls.astype(F32)
        dmj = dmin[:, None] * lm.astype(F32)
        L = final_levels(x, dj, dmj, 0, nmax, Lsearch)
    head = np.concatenate([d_bits[:, None].view(np.uint8), dmin_bits[:, None].view(np.uint8),
                           pack_scale_min_k4(ls, lm)], axis=1)
    return head, L


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: d, dmin (fp16), 12 scale bytes, 128 bytes of 4-bit levels."""
    head, L = _qkx_superblock(blocks, 15, -1.0, 20)
    L4 = L.reshape(-1, 4, 2, 32)
    qs = L4[:, :, 0] | (L4[:, :, 1] << 4)
    return np.concatenate([head, qs.reshape(-1, 128)], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref: d, dmin, 12 scale bytes, 32 bytes of high bits, 128 of low nibbles."""
    head, L = _qkx_superblock(blocks, 31, -0.5, 15)
    L4 = L.reshape(-1, 4, 2, 32)
    lo = L4 & 0xF
    hi = L4 >> 4
    ql = lo[:, :, 0] | (lo[:, :, 1] << 4)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None, None] + np.array(
        [0, 1], dtype=np.uint8)[None, None, :, None]
    qh = np.bitwise_or.reduce(hi << shifts, axis=(1, 2)).astype(np.uint8)
    return np.concatenate([head, qh, ql.reshape(-1, 128)], axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, d."""
    B = blocks.shape[0]
    x = columns(blocks, 16)
    with np.errstate(all="ignore"):
        scales, Lsearch = make_qx_quants_rmse1(x, 32)
        scales = scales.reshape(B, 16)
        finite = np.isfinite(scales).all()
        max_abs, max_scale = (first_abs_max_finite if finite else first_abs_max)(scales.T)
        zero = max_abs < GROUP_MAX_EPS
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
        d_bits, d = fp16_round(F32(1) / iscale)
        sq = np.minimum(127, nearest_int(iscale[:, None] * scales))
        sq = ((sq + 128) & 0xFF) - 128  # stored in int8_t
        dj = d[:, None] * sq.astype(F32)
        L = final_levels(x, dj, None, -32, 31, Lsearch, offset=32)
    L = L.reshape(B, 2, 4, 32)
    lo = L & 0xF
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(B, 128), qh.reshape(B, 64),
                          sq.astype(np.int8).view(np.uint8), d_bits[:, None].view(np.uint8)], axis=1)
    out[zero] = 0
    return out

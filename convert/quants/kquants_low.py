"""Q2_K and Q3_K quantizers, byte-identical to ggml's ``quantize_row_q{2,3}_K_ref``.

Same approach as :mod:`.kquants` (columns of sub-blocks, C's float32 operations in C's order).
Input: float32 ``(n_blocks, 256)``; output: uint8 ``(n_blocks, type_size)``.
"""
from __future__ import annotations

import numpy as np

from .ggml_float import F32, fp16_round, nearest_int, seq_sum
from .kquants import (GROUP_MAX_EPS, QK_K, _levels, columns, first_abs_max, first_abs_max_finite,
                      final_levels, make_qkx2_quants, running_max)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs of Q2_K/Q3_K: byte ``j/4 + l`` holds levels ``j+l, j+l+32, j+l+64, j+l+96`` (2 bits each)."""
    L4 = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    q = L4[:, :, 0] | (L4[:, :, 1] << 2) | (L4[:, :, 2] << 4) | (L4[:, :, 3] << 6)
    return q.reshape(-1, 64)


def quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q2_K_ref: 16 scale/min nibble pairs, 64 bytes of 2-bit levels, d, dmin."""
    B = blocks.shape[0]
    x = columns(blocks, 16)
    with np.errstate(all="ignore"):
        scales, mins, Lsearch = make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
        scales = scales.reshape(B, 16)
        mins = mins.reshape(B, 16)
        max_scale = running_max(scales)
        max_min = running_max(mins)
        q4scale = F32(15)

        has_s = max_scale > 0
        ls = np.where(has_s[:, None], nearest_int((q4scale / max_scale)[:, None] * scales), 0) & 0xFF
        d_bits, d = fp16_round(np.where(has_s, max_scale / q4scale, F32(0)))
        has_m = max_min > 0
        lm = nearest_int((q4scale / max_min)[:, None] * mins)
        sc = np.where(has_m[:, None], (ls | (lm << 4)) & 0xFF, ls)
        dmin_bits, dmin = fp16_round(np.where(has_m, max_min / q4scale, F32(0)))

        dj = d[:, None] * (sc & 0xF).astype(F32)
        dmj = dmin[:, None] * (sc >> 4).astype(F32)
        L = final_levels(x, dj, dmj, 0, 3, Lsearch)
    return np.concatenate([sc.astype(np.uint8), _pack_2bit(L),
                           d_bits[:, None].view(np.uint8), dmin_bits[:, None].view(np.uint8)], axis=1)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Mirror of ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` over columns (n, S).

    The refinement visits the elements of a sub-block one after the other and each accepted change
    feeds the next; that order is kept (a Python loop over the n elements, vectorised over columns).
    Returns (scale, L) with L = level + nmax as float32 (0 for all-zero columns, as in C).
    """
    n, S = x.shape
    with np.errstate(all="ignore"):
        amax, vmax = first_abs_max_finite(x)
        zero = amax < GROUP_MAX_EPS
        vmax = np.where(zero, F32(1), vmax)
        # |x| <= |max| >= 1e-15 in a non-zero column, so |iscale*x| <= nmax: rint is exact
        L = _levels(x * (F32(-nmax) / vmax), -nmax, nmax - 1, True)
        w = x * x
        wx = w * x
        sumlx = seq_sum(wx * L)
        suml2 = seq_sum(w * L * L)
        lo, hi = -nmax, nmax - 1
        # Only columns changed by a pass can change in the next one (a pass that changes nothing
        # leaves the state as it was: C's 'if (!n_changed) break'), so later passes run on those.
        cols = np.arange(S)
        xa, wa, wxa, La, slx_a, sl2_a = x, w, wx, L, sumlx, suml2
        for _ in range(5):
            changed = np.zeros(cols.size, dtype=bool)
            for i in range(n):
                Li = La[i]
                slx = slx_a - wxa[i] * Li
                sl2 = sl2_a - wa[i] * Li * Li
                new_l = np.clip(nearest_int(xa[i] * sl2 / slx), lo, hi).astype(F32)
                cand = (slx > 0) & (new_l != Li)
                slx = slx + wxa[i] * new_l
                sl2 = sl2 + wa[i] * new_l * new_l
                accept = cand & (sl2 > 0) & (slx * slx * sl2_a > slx_a * slx_a * sl2)
                if accept.any():
                    changed |= accept
                    La[i] = np.where(accept, new_l, Li)
                    slx_a = np.where(accept, slx, slx_a)
                    sl2_a = np.where(accept, sl2, sl2_a)
            if La is L:  # first pass, on every column: L was updated in place
                sumlx, suml2 = slx_a, sl2_a
            else:
                L[:, cols] = La
                sumlx[cols] = slx_a
                suml2[cols] = sl2_a
            keep = np.flatnonzero(changed)
            if keep.size == 0:
                break
            cols = cols[keep]
            xa, wa, wxa, La = x[:, cols], w[:, cols], wx[:, cols], La[:, keep]
            slx_a, sl2_a = slx_a[keep], sl2_a[keep]
        L += F32(nmax)
        L[:, zero] = 0
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
        scale = np.where(zero, F32(0), scale)
    return scale.astype(F32, copy=False), L


def _pack_q3_scales(l6: np.ndarray) -> np.ndarray:
    """The 12-byte packing of sixteen 6-bit scales in quantize_row_q3_K_ref."""
    l6 = l6.astype(np.uint8)
    out = np.empty(l6.shape[:-1] + (12,), dtype=np.uint8)
    out[..., 0:8] = (l6[..., 0:8] & 0xF) | ((l6[..., 8:16] & 0xF) << 4)
    hi = (l6 >> 4).reshape(l6.shape[:-1] + (4, 4))  # [j // 4, j % 4]
    out[..., 8:12] = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    return out


def quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q3_K_ref: 32 bytes high-bit mask, 64 bytes of low 2 bits, 12 scale bytes, d."""
    B = blocks.shape[0]
    x = columns(blocks, 16)
    with np.errstate(all="ignore"):
        scales, Lsearch = make_q3_quants(x, 4)
        scales = scales.reshape(B, 16)
        finite = np.isfinite(scales).all()
        _, max_scale = (first_abs_max_finite if finite else first_abs_max)(scales.T)
        has = max_scale != 0
        iscale = F32(-32) / np.where(has, max_scale, F32(1))
        l = nearest_int(iscale[:, None] * scales)
        l = np.clip(((l + 128) & 0xFF) - 128, -32, 31) + 32  # int8_t, then MAX/MIN
        l = np.where(has[:, None], l, 0)
        d_bits, d = fp16_round(np.where(has, F32(1) / iscale, F32(0)))
        dj = d[:, None] * (l - 32).astype(F32)
        L = final_levels(x, dj, None, -4, 3, Lsearch, offset=4)
    high = (L >> 2).reshape(B, 8, 32)
    hmask = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    return np.concatenate([hmask.astype(np.uint8), _pack_2bit(L & 3), _pack_q3_scales(l),
                           d_bits[:, None].view(np.uint8)], axis=1)

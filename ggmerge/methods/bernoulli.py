"""DARE's Bernoulli masks, drawn exactly as ``torch.bernoulli(p_tensor, generator=gen)`` draws them, faster.

torch's CPU kernel (ATen ``bernoulli_kernel`` over a float32 probability tensor) takes, per element and in
order, one 32-bit output ``y`` of the generator's MT19937 engine and keeps the element when
``(y & 0xFFFFFF) · 2⁻²⁴ < p`` (``uniform_real_distribution<float>``, then ``bernoulli``). It does so
through a generic per-element loop with a lock and a virtual call, ~10 ns an element. The same engine
(Matsumoto–Nishimura's ``genrand`` with the ``next_state`` refill ATen's ``at::mt19937`` uses) compiled
by numba gives the same bits at a fraction of the cost. The generator's state is read from and written
back to the ``torch.Generator`` (``get_state``/``set_state``), so torch and this module can take turns
on one generator; the tests compare both on many sizes and states.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

_N, _M = 624, 397
# ATen's CPUGeneratorImplState: legacy pod {u64 seed; i32 left; i32 seeded; u64 next; u64 state[624]; ...}
_LEFT, _NEXT, _STATE = 8, 16, 24


@njit(cache=True, nogil=True)
def _refill(mt):
    upper, lower, matrix = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(0x9908B0DF)
    for j in range(_N - _M):
        y = (mt[j] & upper) | (mt[j + 1] & lower)
        mt[j] = mt[j + _M] ^ (y >> np.uint32(1)) ^ (matrix * (mt[j + 1] & np.uint32(1)))
    for j in range(_N - _M, _N - 1):
        y = (mt[j] & upper) | (mt[j + 1] & lower)
        mt[j] = mt[j + _M - _N] ^ (y >> np.uint32(1)) ^ (matrix * (mt[j + 1] & np.uint32(1)))
    y = (mt[_N - 1] & upper) | (mt[0] & lower)
    mt[_N - 1] = mt[_M - 1] ^ (y >> np.uint32(1)) ^ (matrix * (mt[0] & np.uint32(1)))


@njit(cache=True, nogil=True)
def _draw(mt, pos, p24, out):
    """Fill ``out`` (uint8, may be empty: then only advance) with masks; ``pos`` = [left, next, count];
    ``p24`` = p · 2²⁴ as float64 (exact for a float32 p)."""
    left, nxt = pos[0], pos[1]
    n = out.size if out.size else pos[2]
    i = 0
    while i < n:
        # ATen refills when `--left` reaches 0: `left - 1` outputs remain in this state block
        if left == 1:
            _refill(mt)
            left, nxt = _N + 1, 0
        take = min(left - 1, n - i)
        if out.size:
            for j in range(take):
                y = mt[nxt + j]
                y ^= y >> np.uint32(11)
                y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
                y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
                y ^= y >> np.uint32(18)
                out[i + j] = np.float64(y & np.uint32(0xFFFFFF)) < p24
        i += take
        nxt += take
        left -= take
    pos[0], pos[1] = left, nxt


def _run(gen: torch.Generator, p: float, out: np.ndarray, count: int) -> None:
    state = gen.get_state()
    raw = state.numpy()
    left = int(raw[_LEFT:_LEFT + 4].view(np.int32)[0])
    nxt = int(raw[_NEXT:_NEXT + 8].view(np.uint64)[0])
    mt = raw[_STATE:_STATE + 8 * _N].view(np.uint64).astype(np.uint32)
    pos = np.array([left, nxt, count], dtype=np.int64)
    _draw(mt, pos, float(np.float32(p)) * 16777216.0, out)
    raw[_LEFT:_LEFT + 4].view(np.int32)[0] = pos[0]
    raw[_NEXT:_NEXT + 8].view(np.uint64)[0] = pos[1]
    raw[_STATE:_STATE + 8 * _N].view(np.uint64)[:] = mt
    gen.set_state(state)


def bernoulli_mask(shape, p: float, gen: torch.Generator) -> torch.Tensor:
    """A bool mask of ``shape``, the bits of ``torch.bernoulli(torch.full(shape, p), generator=gen) != 0``
    (float32 p), advancing ``gen`` exactly as that call does."""
    out = np.empty(int(np.prod(shape)), dtype=np.uint8)
    if out.size:
        _run(gen, p, out, out.size)
    return torch.from_numpy(out).view(torch.bool).reshape(tuple(shape))


def skip(gen: torch.Generator, n: int) -> None:
    """Advance ``gen`` past the draws of ``n`` mask entries."""
    if n > 0:
        _run(gen, 0.5, np.empty(0, dtype=np.uint8), int(n))

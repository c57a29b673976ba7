"""DARE's masks: ggmerge's compiled MT19937 draws the very bits torch.bernoulli draws, and leaves the
generator where torch would, so either can continue."""
from __future__ import annotations

import pytest
import torch

from ggmerge.methods.bernoulli import bernoulli_mask, skip


@pytest.mark.parametrize("seed,sizes,p", [
    (0, [1000], 0.7),
    (5, [1, 623, 624, 625, 1300, 5, 1, 1, 1, 622, 1, 1], 0.3),  # every refill boundary
    (123, [2331, 100_000], 0.5),
    (9, [1_000_000], 0.9999),
    (4, [0, 3, 0], 0.1),
    (2**62 + 7, [4096], 0.7000000001),  # p rounded to float32, as torch.full rounds it
])
def test_masks_and_state_equal_torch(seed, sizes, p):
    ref, ours = torch.Generator(), torch.Generator()
    ref.manual_seed(seed)
    ours.manual_seed(seed)
    for n in sizes:
        want = torch.bernoulli(torch.full((n,), p), generator=ref) != 0
        got = bernoulli_mask((n,), p, ours)
        assert got.dtype == torch.bool and torch.equal(got, want), n
        assert torch.equal(ours.get_state(), ref.get_state()), n
    # torch continues from where we left the generator
    assert torch.equal(torch.rand(5, generator=ours), torch.rand(5, generator=ref))


def test_shape_and_skip():
    ref, ours = torch.Generator(), torch.Generator()
    ref.manual_seed(3)
    ours.manual_seed(3)
    want = torch.bernoulli(torch.full((37, 41), 0.6), generator=ref)
    assert torch.equal(bernoulli_mask((37, 41), 0.6, ours), want != 0)
    for n in (12345, 1, 623, 624, 2000):
        torch.bernoulli(torch.full((n,), 0.2), generator=ref)
        skip(ours, n)
        assert torch.equal(ours.get_state(), ref.get_state()), n

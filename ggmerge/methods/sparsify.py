"""Sparsify a task vector (delta): which entries survive, and how the survivors are rescaled.

Pure functions on one float32 delta. Each returns a new tensor of the same shape; none mutates its
input. Semantics follow mergekit 0.1.5 ``mergekit/sparsify.py`` exactly (including its edge cases:
``density >= 1`` is the identity, a positive density keeps at least one entry for magnitude pruning,
rescaling matches the L1 norm of the kept entries to the original's). Sort calls are the same
(non-stable) torch calls mergekit makes, so ties in magnitude are broken the same way on CPU.

The random variants (DARE's Bernoulli drop, DELLA's rank-weighted drop) draw ONLY from the
``torch.Generator`` they are given, so the same generator state reproduces the same bytes.
"""
from __future__ import annotations

import torch

from ..errors import GGMergeError
from .bernoulli import bernoulli_mask

# mergekit.sparsify.rescaled_masked_tensor: norms below this are treated as zero (no rescale).
RESCALE_EPS = 1e-7


def rescale_l1(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``delta * mask``, scaled so its L1 norm equals ``delta``'s when ``rescale`` (mirrors
    mergekit ``rescaled_masked_tensor`` with ``RescaleNorm.l1``, the only norm its methods use)."""
    masked = delta * mask
    if not rescale:
        return masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` largest-magnitude entries (TIES' trim step;
    mergekit ``sparsify.magnitude``)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    order = torch.argsort(delta.abs().reshape(-1), descending=True)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[order[:k]] = 1
    return rescale_l1(delta, mask.reshape(delta.shape), rescale)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool = False
) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``int(gamma·n)`` largest and then enough of the smallest
    magnitudes to keep ``int(density·n)`` entries (mergekit ``sparsify.magnitude_outliers``).

    When density + gamma > 1 the outlier cut shrinks so the kept count is still ``int(density·n)``.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    ascending = torch.sort(delta.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[ascending[n_bottom : n_bottom + keep]] = 1
    return rescale_l1(delta, mask.reshape(delta.shape), rescale)


def bernoulli(
    delta: torch.Tensor, density: float, gen: torch.Generator, rescale: bool = False
) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (mergekit
    ``sparsify.bernoulli``), drawing from ``gen`` only."""
    if density >= 1:
        return delta
    # the bits of torch.bernoulli(full_like(delta, density), generator=gen), drawn 5x faster
    mask = bernoulli_mask(delta.shape, float(density), gen)
    return rescale_l1(delta, mask, rescale)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability per entry (mergekit ``sparsify.della_magprune``).

    Entries are ranked by magnitude within each row (dim 1 after promoting 1-D tensors to one row);
    ranks are mapped linearly to ``[density − ε, density + ε]``: the smallest magnitude gets
    density − ε, the largest density + ε. Returned in the promoted (≥ 2-D) shape.
    """
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    ranks = order.argsort(dim=1).to(torch.float32) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    # A row of one entry has hi == lo; mergekit divides 0/0 there (NaN → bernoulli error).
    # We give it rank 0, i.e. probability density − ε, so a 1-wide row merges instead of crashing.
    rank_norm = torch.nan_to_num((ranks - lo) / (hi - lo), nan=0.0).clamp(0, 1)
    return (density - epsilon) + rank_norm * (2 * epsilon)


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    gen: torch.Generator,
    rescale: bool = False,
) -> torch.Tensor:
    """DELLA MagPrune: Bernoulli drop with magnitude-ranked keep probabilities (see
    :func:`della_probabilities`), then L1 rescale. Raises GGMergeError unless
    ``0 < density ± ε < 1``."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della(density, epsilon)
    probs = della_probabilities(delta, density, epsilon)
    mask = torch.bernoulli(probs, generator=gen)
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    return rescale_l1(rows, mask, rescale).reshape(delta.shape)


def check_della(density: float, epsilon: float) -> None:
    """mergekit's constraint for DELLA (only when 0 < density < 1): density ± ε inside (0, 1).
    A recipe mistake, so a GGMergeError naming the key (the caller adds the tensor)."""
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise GGMergeError(
            f"della needs 0 < density - epsilon and density + epsilon < 1 "
            f"(density={density}, epsilon={epsilon})",
            key="epsilon",
        )

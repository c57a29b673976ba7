"""Arcee Fusion, mirroring mergekit 0.1.5 ``arcee_fusion_merge_method``: take the other model's value
only where it matters most.

With base b and one other model p (rows over the last dim; a 1-D tensor is one row):

    importance = |p − b| · KL(softmax(p) ‖ softmax(b))   (the KL per row, each softmax + 1e-8)
    threshold  = median + 1.5·(q3 − q1)                  (quantiles of importance over the tensor)
    result     = b + (p − b)·[importance ≥ threshold]

Quantiles are mergekit's: the value at index ``int(q·(n−1))`` of the sorted importances (no
interpolation). Above 1,000,000 elements mergekit sorts a sample of 1,000,000 drawn with replacement
from torch's global RNG; we draw the same-sized sample from the per-tensor generator (so a rebuild
gives the same bytes), which keeps the statistic but not mergekit's exact draw. A whole-tensor method:
the chunked evaluator runs it whole.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: mergekit's _QUANTILE_SAMPLE_SIZE
QUANTILE_SAMPLE = 1_000_000


def importance(p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|p − b| times the per-row KL divergence of softmax(p) from softmax(b) (mergekit
    ``_compute_importance``)."""
    eps = 1e-8
    sp = F.softmax(p, dim=-1) + eps
    sb = F.softmax(b, dim=-1) + eps
    kl = torch.sum(sp * torch.log(sp / sb), dim=-1, keepdim=True)
    return (p - b).abs() * kl


def threshold(scores: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """median + 1.5·IQR of ``scores`` by mergekit's index quantiles (``calculate_dynamic_threshold``)."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        if gen is None:
            raise ValueError("arcee_fusion samples large tensors: pass the per-tensor seeded generator")
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=gen)]
    ordered = torch.sort(flat).values
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, med, q3 = ordered[idx]
    return med + 1.5 * (q3 - q1)


def arcee_fusion(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    gen: torch.Generator | None,
) -> torch.Tensor:
    if base is None or len(models) != 1:
        raise ValueError("arcee_fusion needs a base and exactly one other model")
    p = models[0]
    scores = importance(p, base)
    mask = (scores >= threshold(scores, gen)).float()
    return base + (p - base) * mask

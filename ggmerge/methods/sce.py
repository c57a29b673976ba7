"""SCE (Select, Calculate, Erase; arXiv 2408.07990), mirroring mergekit 0.1.5 ``sce_merge``.

With task vectors τᵢ = modelᵢ − base (stacked on dim 0):

1. Select (only when ``select_topk`` < 1): per element, the variance of τ across the models
   (population variance); keep the ``int(nnz(var)·select_topk)`` elements of largest variance in
   every τᵢ, zero the rest;
2. Calculate: each model's weight is its mean squared τ over the whole tensor, normalised to sum 1
   (equal weights 1/N when that sum is below 1e-6);
3. Erase: TIES "sum" sign election (:func:`consensus_mask`); an element takes part only where its sign
   is the elected one;
4. result = base + Σ wᵢ·maskᵢ·τᵢ / max(Σ wᵢ·maskᵢ, 1e-6).

Weights and the selection are whole-tensor statistics, so the chunked evaluator runs this whole. The
torch calls (``var``, ``topk``, the in-order stack sums) are the ones mergekit makes, so a float32 run
gives the same bits. mergekit takes no per-model parameter: a recipe's ``weight`` is ignored.
"""
from __future__ import annotations

from typing import Any

import torch

from .task_arithmetic import consensus_mask


def select_mask(tvs: torch.Tensor, select_topk: float) -> torch.Tensor:
    """0/1 mask (the shape of one task vector) of the elements with the largest variance across
    the stacked task vectors ``tvs`` (mergekit ``sce_mask``)."""
    if select_topk <= 0:
        return torch.zeros_like(tvs[0])
    if select_topk >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * select_topk)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    top = torch.topk(var.abs().view(-1), k=k, largest=True).indices
    mask.view(-1)[top] = 1
    return mask


def model_weights(tvs: torch.Tensor) -> torch.Tensor:
    """Each task vector's mean square, normalised to sum 1 (mergekit ``sce_weight``)."""
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    if abs(total) < 1e-6:
        return torch.ones_like(w) / w.shape[0]
    return w / total


def sce(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    gen: torch.Generator | None,
) -> torch.Tensor:
    if base is None:
        raise ValueError("sce needs a base tensor")
    if not models:
        return base.clone()
    tvs = torch.stack([m - base for m in models], dim=0)
    topk = float(params["select_topk"])
    if topk < 1:
        tvs = tvs * select_mask(tvs, topk).unsqueeze(0)
    keep = consensus_mask(tvs, "sum")
    w = model_weights(tvs).reshape(len(models), *([1] * base.dim()))
    kept_w = w * keep
    mixed = (tvs * kept_w).sum(dim=0)
    return base + mixed / torch.sum(kept_w, dim=0).clamp(min=1e-6)

"""Model Stock (arXiv 2403.19522), mirroring mergekit 0.1.5 ``model_stock_merge_method``.

With offsets dᵢ = modelᵢ − base (N ≥ 2 models), cos θ is the MEAN of the pairwise cosines
cos(dᵢ, dⱼ), i < j (each norm product clamped to ≥ 1e-6, each cosine to [−1, 1]). Then

    t = N·cos θ / (1 + (N − 1)·cos θ),   result = t·mean(models) + (1 − t)·base

and t = 0 (keep the base) where |1 + (N − 1)·cos θ| < 1e-6. With ``filter_wise`` the cosines and t
are per row (reduction over the last dim; a 1-D tensor is one row), else per whole tensor.
"""
from __future__ import annotations

from typing import Any

import torch


def model_stock_t(offsets: list[torch.Tensor]) -> torch.Tensor:
    """t over the last dim of the given offsets (shape [..., 1])."""
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return t_from_cosines(cosines, len(offsets))


def t_from_cosines(cosines: list[torch.Tensor], n: int) -> torch.Tensor:
    """t from the pairwise cosines of ``n`` offsets (the chunked evaluator gets them from a Gram matrix)."""
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denom), denom)
    return torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)


def model_stock(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    gen: torch.Generator | None,
) -> torch.Tensor:
    if base is None or len(models) < 2:
        raise ValueError("model_stock needs a base and at least two other models")
    shape = base.shape
    if params["filter_wise"]:
        if base.dim() == 1:
            base, models = base.unsqueeze(0), [m.unsqueeze(0) for m in models]
    else:
        base, models = base.reshape(-1), [m.reshape(-1) for m in models]
    t = model_stock_t([m - base for m in models])
    average = sum(models) / len(models)
    return (t * average + (1 - t) * base).reshape(shape)

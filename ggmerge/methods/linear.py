"""Linear (weighted average) and passthrough: the methods with no base/delta structure.

``linear`` mirrors mergekit 0.1.5 ``linear_merge``: Σ wᵢ·xᵢ accumulated in input order with
``addcmul_`` (as mergekit does, so the float32 rounding sequence is the same), then divided by
Σ wᵢ when ``normalize``. mergekit treats a recipe's base model as one more weighted input here
(see ``Method.base_is_model``).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import GGMergeError


def linear(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    gen: torch.Generator | None,
) -> torch.Tensor:
    if base is not None:
        raise ValueError("linear takes the base model as an ordinary entry of `models`")
    weights = torch.tensor([float(p["weight"]) for p in model_params], dtype=torch.float32)
    result = torch.zeros_like(models[0])
    for tensor, w in zip(models, weights):
        result.addcmul_(tensor, w)
    if params["normalize"]:
        total = weights.sum()
        # mergekit divides anyway and writes inf/NaN; a weight sum of 0 is a recipe mistake.
        if total == 0:
            raise GGMergeError(
                "linear with normalize: true needs weights that do not sum to 0", key="weight"
            )
        result.div_(total)
    return result


def passthrough(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    gen: torch.Generator | None,
) -> torch.Tensor:
    """The single input, times its optional ``scale`` (mergekit ``passthrough_merge_method``)."""
    if base is not None or len(models) != 1:
        raise ValueError("passthrough takes exactly one input in `models`")
    scale = model_params[0].get("scale")
    return models[0].clone() if scale is None else models[0] * float(scale)

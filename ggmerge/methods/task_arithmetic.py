"""Generalized task arithmetic: the one kernel behind task_arithmetic, TIES, DARE, DELLA, Breadcrumbs.

Mirrors mergekit 0.1.5 ``GeneralizedTaskArithmeticMerge.merge_group`` and ``get_mask``:

1. per model, delta_i = model_i − base, sparsified by the configured function (or not at all);
2. delta_i *= weight_i;
3. with a consensus method, an entry of delta_i takes part only where its sign equals the elected
   sign (TIES "sum": the sign of Σ weighted deltas, ties elect +; "count": the majority of signs);
   the divisor is the sum of the weights of the models taking part there (0 → 1);
   without consensus every entry takes part and the divisor is Σ weights (|Σ| < 1e-8 → 1);
4. mixed = Σ delta_i (masked); if ``normalize``: mixed /= divisor; if ``lambda`` ≠ 1: mixed *= lambda;
5. result = base + mixed.

Which sparsify function and consensus a method uses is configuration, bound with
``functools.partial`` in :mod:`ggmerge.methods`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from . import sparsify as sp

# (delta, one model's params, rescale, generator) -> sparsified delta
Sparsifier = Callable[[torch.Tensor, dict[str, Any], bool, "torch.Generator | None"], torch.Tensor]


def _need_gen(gen: torch.Generator | None, what: str) -> torch.Generator:
    if gen is None:
        raise ValueError(f"{what} is random: pass the per-tensor seeded generator")
    return gen


SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": lambda d, p, rescale, gen: sp.magnitude(d, p["density"], rescale),
    "magnitude_outliers": lambda d, p, rescale, gen: sp.magnitude_outliers(
        d, p["density"], p["gamma"], rescale
    ),
    # density >= 1 keeps everything and draws nothing (the chunked evaluator passes no generator then)
    "random": lambda d, p, rescale, gen: d if p["density"] >= 1 else sp.bernoulli(
        d, p["density"], _need_gen(gen, "DARE"), rescale
    ),
    "della_magprune": lambda d, p, rescale, gen: d if p["density"] >= 1 else sp.della_magprune(
        d, p["density"], p["epsilon"], _need_gen(gen, "DELLA"), rescale
    ),
}


def consensus_mask(weighted_deltas: torch.Tensor, method: str) -> torch.Tensor:
    """Boolean mask [models, ...]: True where a model's delta has the elected sign.

    ``weighted_deltas`` is stacked on dim 0. Zero entries have sign 0, which never equals the
    elected ±1, so they neither count toward the divisor nor contribute (mergekit ``get_mask``).
    """
    signs = weighted_deltas.sign()
    if method == "sum":
        elected = (weighted_deltas.sum(dim=0) >= 0).to(signs.dtype) * 2 - 1
    elif method == "count":
        elected = (signs.sum(dim=0) >= 0).to(signs.dtype) * 2 - 1
    else:
        raise ValueError(f"unknown consensus method {method!r}")
    return signs == elected


def generalized_task_arithmetic(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    gen: torch.Generator | None,
    *,
    sparsify: str | None,
    consensus: str | None,
    sparsifier: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    partial: tuple[int, torch.Tensor] | None = None,
    on_partial: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """See the module docstring. ``params``: normalize, rescale, lambda (int8_mask is accepted and
    ignored: in mergekit it only picks the dtype of the ±1 sign tensor, never changing a value).

    For the chunked evaluator: ``sparsifier(i, delta)`` replaces the configured sparsify step for
    model ``i`` (it applies masks and rescale factors computed over the whole tensor);
    ``partial = (j, mixed)`` is the sum of the first ``j`` weighted deltas, already computed by
    another stage, and ``on_partial(j, mixed)`` sees each such sum as it is built (only without a
    consensus step, where the sum is a plain in-order accumulation)."""
    if base is None:
        raise ValueError("task arithmetic needs a base tensor")
    if not models:
        return base.clone()
    rescale = bool(params["rescale"])
    weights_f = [float(p["weight"]) for p in model_params]

    def weighted_delta(i: int, model: torch.Tensor, p: dict[str, Any], w: float) -> torch.Tensor:
        delta = model - base
        if sparsifier is not None:
            delta = sparsifier(i, delta)
        elif sparsify is not None:
            delta = SPARSIFIERS[sparsify](delta, p, rescale, gen)
        # w rounded to the tensor's dtype first, exactly like mergekit's weight tensor
        return delta.mul_(torch.tensor(w, dtype=delta.dtype))

    if consensus is None or len(models) == 1:
        # No stacked [models, ...] tensor: accumulate in model order. torch's sum over dim 0 of the
        # stack adds the rows in the same order, so the bits are the same, at a fraction of the memory.
        done, mixed = partial if partial is not None else (0, None)
        for i in range(done, len(models)):
            d = weighted_delta(i, models[i], model_params[i], weights_f[i])
            mixed = d if mixed is None else mixed.add_(d)
            if on_partial is not None and i + 1 < len(models):
                on_partial(i + 1, mixed)
        if consensus is None:
            divisor = torch.tensor(weights_f, dtype=base.dtype).sum()
            if divisor.abs() < 1e-8:
                divisor = torch.ones((), dtype=base.dtype)
        else:
            # one model: the elected sign is its own, so every non-zero entry takes part and a zero
            # entry (sign 0 never equals the elected ±1) gets divisor 1 (mergekit get_mask)
            divisor = torch.where(mixed != 0, torch.tensor(weights_f[0], dtype=base.dtype),
                                  torch.ones((), dtype=base.dtype)) if params["normalize"] else None
    else:
        deltas = torch.empty((len(models), *base.shape), dtype=base.dtype)
        for i, (model, p, w) in enumerate(zip(models, model_params, weights_f)):
            deltas[i] = weighted_delta(i, model, p, w)
        weights = torch.tensor(weights_f, dtype=base.dtype).reshape(len(models), *([1] * base.dim()))
        mask = consensus_mask(deltas, consensus)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1

    if params["normalize"]:
        mixed /= divisor
    lam = float(params["lambda"])
    if lam != 1:
        mixed *= lam
    return base + mixed

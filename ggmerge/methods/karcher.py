"""Karcher (Riemannian) mean on the unit sphere, mirroring mergekit 0.1.5 ``karcher_merge_tensors``.

Each input tensor x is split into its norm ‖x‖ and direction u = x/‖x‖ (whole tensor, flattened). The
directions' weighted Karcher mean is found by Riemannian gradient steps from the normalised weighted
average: per step, the tangent Σ αᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·μ) (θᵢ the angle between μ and uᵢ; inputs
with θᵢ < tol skipped), then μ ← cos‖g‖·μ + sin‖g‖·g/‖g‖, renormalised; at most ``max_iter`` steps,
stopping once ‖g‖ < tol. The result is μ scaled by the weighted mean of ALL the norms.

Weights are equal (1/N over every input, the base included: mergekit treats ``base_model`` as one
more input, like linear). Inputs with a norm ≤ tol are left out of the direction (their weight is
renormalised away) but still count in the norm. A whole-tensor method: the chunked evaluator runs it
whole. The operations are mergekit's own, in its order, so a float32 run gives the same bits (a cycle
of μ is detected and jumped over, which changes no bit, see :func:`karcher_mean`).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean of ``tensors`` (see the module docstring)."""
    if len(tensors) == 1:
        return tensors[0]
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(acc)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]

    mu = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mu += ai * ui
    n_mu = torch.linalg.vector_norm(mu.to(acc))
    mu = u[0].clone() if n_mu.item() < tol else (mu / n_mu).to(mu.dtype)

    def step(mu: torch.Tensor) -> torch.Tensor | None:
        """One Riemannian gradient step (None: converged, ‖g‖ < tol)."""
        g = torch.zeros_like(mu)
        for ai, ui in zip(a, u):
            cos = torch.clamp(torch.dot(mu.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            g += ai * (theta / torch.sin(theta)) * (ui - cos * mu)
        n_g = torch.linalg.vector_norm(g.to(acc))
        if n_g.item() < tol:
            return None
        mu = (torch.cos(n_g) * mu + torch.sin(n_g) * (g / n_g)).to(mu.dtype)
        n_mu = torch.linalg.vector_norm(mu.to(acc))
        if n_mu.item() > tol:
            mu = (mu / n_mu).to(mu.dtype)
        return mu

    # The step is a pure function of μ, so once a μ comes back bit for bit the iteration is periodic
    # from there and the μ it would end on after max_iter steps is known: jump to it. Recipes ask for
    # max_iter 9999 with tol 1e-9, which float32 never reaches (mergekit runs every step); the result
    # is unchanged, bit for bit.
    seen: dict[bytes, int] = {}
    k = 0
    while k < max_iter:
        key = hashlib.blake2b(mu.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
        if key in seen:
            for _ in range((max_iter - k) % (k - seen[key])):
                mu = step(mu)
            break
        seen[key] = k
        nxt = step(mu)
        if nxt is None:
            break
        mu, k = nxt, k + 1

    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return scale * mu


def karcher(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    gen: torch.Generator | None,
) -> torch.Tensor:
    if len(models) == 1:
        return models[0].clone()
    alphas = [1.0 / len(models)] * len(models)
    return karcher_mean(models, alphas, int(params["max_iter"]), float(params["tol"]))

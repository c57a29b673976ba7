"""Spherical interpolation: ``slerp`` (base ↔ one model) and ``nuslerp`` (two models, optional base).

``slerp`` mirrors mergekit 0.1.5 ``slerp`` for one tensor: the whole tensor is one vector; the angle
comes from the dot product of the two normalized vectors; when |cos θ| > 0.9995 (nearly colinear or
antipodal) it falls back to linear interpolation. ``t`` = 0 gives the base, 1 the other model.
Norms ≤ 1e-8 are replaced by 1 (a zero tensor then has cos θ = 0, i.e. a 90° arc).
Coefficients are computed on float32 scalars like mergekit's (``t`` is a float32 tensor there).

``nuslerp`` mirrors mergekit ``nuslerp``/``nuslerp_merge_method``: t = w₁/(w₀+w₁) (0.5 if the sum is
~0); with a base it interpolates the two task vectors and adds the base back; by default the tensor
is flattened to one vector (``nuslerp_flatten``), else each row (last dim, or dim 0 with
``nuslerp_row_wise``) is interpolated separately; exact colinearity falls back to lerp.
"""
from __future__ import annotations

from typing import Any

import torch

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp of two same-shape tensors seen as flat vectors (mergekit ``slerp``, one group)."""
    tt = torch.tensor(t, dtype=torch.float32)
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    if a.numel() == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = torch.where(na > NORM_EPS, na, 1)
    nb = torch.where(nb > NORM_EPS, nb, 1)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        ca = torch.sin((1 - tt) * theta) / sin_theta
        cb = torch.sin(tt * theta) / sin_theta
    return (ca * a + cb * b).reshape(v0.shape)


def slerp(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    gen: torch.Generator | None,
) -> torch.Tensor:
    if base is None or len(models) != 1:
        raise ValueError("slerp needs a base and exactly one other model")
    return slerp_vectors(float(params["t"]), base, models[0])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool):
    """mergekit ``nuslerp``: slerp along the last dim (after the flatten / transpose choice)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = (_unit(v0) * _unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NORM_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    gen: torch.Generator | None,
) -> torch.Tensor:
    if len(models) != 2:
        raise ValueError("nuslerp needs exactly two non-base models")
    w0, w1 = (float(p["weight"]) for p in model_params)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    kw = dict(row_wise=bool(params["nuslerp_row_wise"]), flatten=bool(params["nuslerp_flatten"]))
    if base is None:
        return nuslerp_vectors(t, models[0], models[1], **kw)
    return base + nuslerp_vectors(t, models[0] - base, models[1] - base, **kw)

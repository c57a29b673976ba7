"""Merge methods: pure functions on float32 tensors, and the ONE table naming them.

Every method is a :class:`Method` whose ``fn`` has the signature::

    fn(base, models, model_params, params, gen) -> Tensor

* ``base``: the base model's tensor or None; ``models``: the other inputs (never the base, except
  for ``base_is_model`` methods, see below), all float32 and the same shape; the result is float32.
* ``model_params[i]``: the resolved per-model parameters of ``models[i]`` (one value each, already
  resolved for this tensor by :func:`ggmerge.recipe.params.resolve`); ``params``: the method-level ones.
  ``fn`` expects COMPLETE dicts: use :meth:`Method.complete` (or call the Method) to fill defaults.
* ``gen``: the per-tensor generator from :func:`seeded_generator` for ``uses_random`` methods.

No I/O, no dtype casts, no config parsing. Defaults are mergekit 0.1.5's, per method (e.g.
``normalize`` is True for linear/ties/della, False for task_arithmetic/dare_*/breadcrumbs*).

How the recipe layer passes the base model:

* ``requires_base``: ``base`` is the base tensor; ``models`` are the others in recipe order (a base
  listed among ``models:`` in the recipe is removed from the list; its parameters are ignored, as in
  mergekit where these parameters are non-base only).
* ``base_is_model`` (linear, passthrough): mergekit treats the recipe's ``base_model`` as one more
  ordinary input. Pass ``base=None`` and include the base in ``models`` at its listed position (or
  LAST if the recipe names a base_model without listing it, which is where mergekit appends it),
  with its own ``model_params`` (for linear it then needs a ``weight``, e.g. from the recipe's
  global ``parameters``, exactly as mergekit requires).
  karcher is the same: mergekit ignores the base's role and averages every input.
* neither (nuslerp): the base is optional; pass it as ``base`` if the recipe names one, else None.

``int8_mask`` is accepted and ignored: in mergekit it only selects the dtype of the ±1 sign tensor
of the TIES mask; the mask (and so the result) is the same either way.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from ..errors import GGMergeError, did_you_mean
from .arcee_fusion import arcee_fusion
from .karcher import karcher
from .linear import linear, passthrough
from .model_stock import model_stock
from .sce import sce
from .slerp import nuslerp, slerp
from .task_arithmetic import generalized_task_arithmetic


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default marking a parameter the recipe must set."""

# The value type of every parameter any method knows (used to coerce/validate recipe values:
# YAML reads `1e-3` as a string; mergekit's pydantic turns it into a float for float parameters).
PARAM_KINDS: dict[str, type] = {
    "weight": float, "density": float, "gamma": float, "epsilon": float, "lambda": float,
    "t": float, "scale": float, "select_topk": float, "tol": float, "max_iter": int,
    "normalize": bool, "rescale": bool, "int8_mask": bool, "filter_wise": bool,
    "nuslerp_row_wise": bool, "nuslerp_flatten": bool,
}


@dataclass(frozen=True, eq=False)  # identity equality/hash: each method exists once, in METHODS
class Method:
    """A merge method: its function, input contract and parameters with mergekit's defaults.

    ``min_models``/``max_models`` count the entries of ``models`` (so the base too, for
    ``base_is_model`` methods, mirroring mergekit's input contracts)."""

    name: str
    fn: Callable[..., torch.Tensor]
    requires_base: bool
    model_params: dict[str, Any]
    params: dict[str, Any]
    uses_random: bool = False
    min_models: int = 1
    max_models: int | None = None
    base_is_model: bool = False
    reference: str = ""
    #: generalized task arithmetic: its sparsify function and consensus (None: none)
    task_arithmetic: bool = False
    sparsify: str | None = None
    consensus: str | None = None

    def complete(
        self,
        model_params: list[dict[str, Any]],
        params: dict[str, Any],
        *,
        tensor: str | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Fill defaults (unknown names are dropped); a missing REQUIRED value is a GGMergeError."""
        filled = [_fill(self.model_params, p, tensor, f"model {i}") for i, p in enumerate(model_params)]
        return filled, _fill(self.params, params, tensor, None)

    def __call__(
        self,
        base: torch.Tensor | None,
        models: list[torch.Tensor],
        model_params: list[dict[str, Any]] | None = None,
        params: dict[str, Any] | None = None,
        gen: torch.Generator | None = None,
        *,
        tensor: str | None = None,
    ) -> torch.Tensor:
        """Complete the parameters, check the input counts, and run ``fn``."""
        if model_params is None:
            model_params = [{} for _ in models]
        if len(model_params) != len(models):
            raise ValueError("one model_params dict per model")
        self.check_counts(base is not None, len(models))
        mp, p = self.complete(model_params, params or {}, tensor=tensor)
        try:
            return self.fn(base, list(models), mp, p, gen)
        except GGMergeError as e:  # a method's own check (e.g. della's epsilon): name the tensor
            if e.tensor is None:
                e.tensor = tensor
            raise

    def check_counts(self, has_base: bool, n_models: int, *, key: str = "models") -> None:
        """The input contract as a user-facing error (the recipe layer calls this at plan time)."""
        if self.requires_base and not has_base:
            raise GGMergeError(f"merge_method {self.name} needs a base_model", key="base_model")
        if self.base_is_model and has_base:
            raise ValueError(f"{self.name}: pass the base model inside `models` (base_is_model)")
        what = "model(s)" if self.base_is_model else "model(s) besides the base"
        if n_models < self.min_models:
            raise GGMergeError(
                f"merge_method {self.name} needs at least {self.min_models} {what}; got {n_models}",
                key=key)
        if self.max_models is not None and n_models > self.max_models:
            raise GGMergeError(
                f"merge_method {self.name} takes at most {self.max_models} {what}; got {n_models}",
                key=key)


def _fill(defaults: dict[str, Any], given: dict[str, Any], tensor: str | None, who: str | None):
    out = {}
    for name, default in defaults.items():
        value = given.get(name, default)
        if value is None and default is not None:
            value = default
        if value is REQUIRED:
            where = f" for {who}" if who else ""
            raise GGMergeError(f"parameter '{name}' is required{where}", key=name, tensor=tensor)
        out[name] = value
    return out


def _gta(name: str, sparsify: str | None, consensus: str | None, normalize: bool, rescale: bool,
         reference: str) -> Method:
    """One configuration of the generalized task-arithmetic kernel (mergekit registry.py values)."""
    model_params: dict[str, Any] = {"weight": REQUIRED, "density": 1.0}
    if sparsify == "magnitude_outliers":
        model_params["gamma"] = 0.01
    if sparsify == "della_magprune":
        model_params["epsilon"] = 0.15
    return Method(
        name=name,
        fn=partial(generalized_task_arithmetic, sparsify=sparsify, consensus=consensus),
        requires_base=True,
        model_params=model_params,
        params={"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
        uses_random=sparsify in ("random", "della_magprune"),
        # mergekit accepts a base alone (the result is the base); keep that.
        min_models=0,
        reference=reference,
        task_arithmetic=True,
        sparsify=sparsify,
        consensus=consensus,
    )


METHODS: dict[str, Method] = {
    "linear": Method(
        name="linear", fn=linear, requires_base=False, base_is_model=True,
        model_params={"weight": REQUIRED}, params={"normalize": True},
        min_models=1, reference="https://arxiv.org/abs/2203.05482"),
    "task_arithmetic": _gta("task_arithmetic", None, None, False, False,
                            "https://arxiv.org/abs/2212.04089"),
    "ties": _gta("ties", "magnitude", "sum", True, False, "https://arxiv.org/abs/2306.01708"),
    "dare_ties": _gta("dare_ties", "random", "sum", False, True, "https://arxiv.org/abs/2311.03099"),
    "dare_linear": _gta("dare_linear", "random", None, False, True,
                        "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": _gta("breadcrumbs", "magnitude_outliers", None, False, False,
                        "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", "magnitude_outliers", "sum", False, False,
                             "https://arxiv.org/abs/2312.06795"),
    "della": _gta("della", "della_magprune", "sum", True, True, "https://arxiv.org/abs/2406.11617"),
    "della_linear": _gta("della_linear", "della_magprune", None, False, True,
                         "https://arxiv.org/abs/2406.11617"),
    "model_stock": Method(
        name="model_stock", fn=model_stock, requires_base=True, model_params={},
        params={"filter_wise": False}, min_models=2, reference="https://arxiv.org/abs/2403.19522"),
    "slerp": Method(
        name="slerp", fn=slerp, requires_base=True, model_params={}, params={"t": REQUIRED},
        min_models=1, max_models=1, reference="https://en.wikipedia.org/wiki/Slerp"),
    "nuslerp": Method(
        name="nuslerp", fn=nuslerp, requires_base=False, model_params={"weight": REQUIRED},
        params={"nuslerp_row_wise": False, "nuslerp_flatten": True}, min_models=2, max_models=2),
    "passthrough": Method(
        name="passthrough", fn=passthrough, requires_base=False, base_is_model=True,
        model_params={"scale": None}, params={}, min_models=1, max_models=1),
    "sce": Method(
        name="sce", fn=sce, requires_base=True, model_params={},
        params={"select_topk": 1.0, "int8_mask": False}, min_models=0,
        reference="https://arxiv.org/abs/2408.07990"),
    "karcher": Method(
        name="karcher", fn=karcher, requires_base=False, base_is_model=True, model_params={},
        params={"max_iter": 10, "tol": 1e-5}, min_models=1,
        reference="https://arxiv.org/abs/2603.04972"),
    # random only above 1M elements, where mergekit samples the importances for its quantiles
    "arcee_fusion": Method(
        name="arcee_fusion", fn=arcee_fusion, requires_base=True, model_params={}, params={},
        uses_random=True, min_models=1, max_models=1, reference="https://arcee.ai"),
}


def get_method(name: str) -> Method:
    """The Method called ``name``, or a GGMergeError naming the recipe key."""
    try:
        return METHODS[name]
    except KeyError:
        raise GGMergeError(
            f"unknown merge_method '{name}'{did_you_mean(name, METHODS)}", key="merge_method"
        ) from None


def seeded_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A CPU generator seeded from (recipe seed, tensor name) only, so every tensor's random mask
    is independent of processing order and a rebuild gives identical bytes. In a multi-stage
    recipe, pass a name that includes the stage (e.g. ``"stage2/model.layers.0.mlp.up_proj.weight"``)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{tensor_name}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen

"""Per-tensor parameter values: mergekit's three forms, resolved for one tensor.

A recipe parameter is one of (mergekit 0.1.5 ``config.ParameterSetting`` / ``evaluate_setting``):

* a scalar (bool, int, float, str): the same value for every tensor;
* a gradient: a list of scalars spread evenly over the layers and linearly interpolated
  (numbers), or picked by position (booleans/strings);
* filters: a ``{filter: substr, value: v}`` mapping or a list of them; the first entry whose
  ``filter`` is a substring of the tensor name wins; an entry without ``filter`` (or ``"*"``)
  matches every tensor; ``v`` is a scalar or a gradient. No match resolves to None, which in
  mergekit means "not set here": the caller falls back to the next scope (model → slice →
  global ``parameters`` → the method's default).

The layer position t mirrors mergekit ``MergePlanner``: layer k of an n-layer slice (the whole model
for the ``models:`` form) has t = k / (n − 1), and t = 1 when n = 1; tensors outside the layers
(``embed_tokens``, the final ``norm``, ``lm_head``) are planned with t = 0, i.e. they take a
gradient's FIRST value.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import GGMergeError

SCALARS = (bool, int, float, str)
FILTER_KEYS = {"filter", "value"}
# pydantic's lax bool parsing, which mergekit applies to bool parameters given as text.
_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def layer_position(layer_index: int | None, num_layers: int) -> float:
    """t in [0, 1] for a gradient: see the module docstring (mergekit ``plan_slice``/``plan_module``)."""
    if layer_index is None:
        return 0.0
    if num_layers > 1:
        return layer_index / (num_layers - 1)
    return 1.0


def resolve(
    value: Any,
    tensor_name: str,
    layer_index: int | None,
    num_layers: int,
    *,
    kind: type | None = None,
    key: str | None = None,
) -> Any:
    """The value ``value`` (any accepted form) takes for one tensor.

    ``layer_index`` is the layer's position within its slice (None for layer-less tensors) and
    ``num_layers`` the slice's length. ``kind`` (float, int or bool; see
    ``ggmerge.methods.PARAM_KINDS``) coerces scalars first, as mergekit's typed parameters do, so
    ``"1e-3"`` (a string to YAML) becomes 0.001 and a numeric gradient is interpolated.
    Returns None if no filter matches.
    """
    return _evaluate(value, tensor_name, layer_position(layer_index, num_layers), kind, key)


def _evaluate(value: Any, name: str, t: float, kind: type | None, key: str | None) -> Any:
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, SCALARS):
        return coerce(value, kind, key=key)
    if not isinstance(value, list):
        raise GGMergeError(f"unexpected parameter value {value!r}", key=key, tensor=name or None)
    if not value:
        return None
    if all(isinstance(v, SCALARS) for v in value):
        values = [coerce(v, kind, key=key) for v in value]
        if not all(_is_number(v) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return coerce((1 - frac) * values[i0] + frac * values[i1], kind, key=key)
    for entry in value:
        if not isinstance(entry, Mapping):
            raise GGMergeError(f"unexpected parameter value {value!r}", key=key, tensor=name or None)
        f = entry.get("filter")
        if f is None or f == "*" or (name and str(f) in name):
            return _evaluate(entry.get("value"), name, t, kind, key)
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def coerce(v: Any, kind: type | None, *, key: str | None = None) -> Any:
    """One scalar as ``kind`` (None: unchanged), or a GGMergeError naming ``key``."""
    if kind is None:
        return v
    bad = GGMergeError(f"expected a {kind.__name__}, got {v!r}", key=key)
    if kind is float:
        if isinstance(v, bool):
            raise bad
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                raise bad from None
        raise bad
    if kind is int:
        if isinstance(v, bool):
            raise bad
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                raise bad from None
        raise bad
    if kind is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            return v.strip().lower() in _TRUE
        raise bad
    if kind is str:
        if isinstance(v, str):
            return v
        raise bad
    raise ValueError(f"unsupported parameter kind {kind!r}")


def validate(value: Any, *, key: str, kind: type | None = None) -> list[str]:
    """Check a recipe value has one of the accepted forms (and, with ``kind``, that every scalar
    converts); raise ``GGMergeError(..., key=key)`` otherwise. Mirrors what mergekit's pydantic
    model accepts: a scalar; a non-empty list of scalars; a ``{filter, value}`` mapping or a list
    of them, whose ``value`` is a scalar or a list of scalars (no nesting of filters).

    Returns what mergekit's pydantic model silently drops (unknown keys of a filter entry, such as
    the ``pattern:`` of old recipes, which leaves that entry without a filter: it matches every
    tensor), for the caller to warn about."""
    ignored: list[str] = []

    def fail(why: str):
        raise GGMergeError(f"parameter '{key}': {why}", key=key)

    def scalar(v: Any, where: str) -> None:
        if v is None:
            fail(f"{where}has no value")
        if not isinstance(v, SCALARS):
            fail(f"{where}expected a scalar, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            fail(f"{where}must be finite, got {v!r}")
        coerce(v, kind, key=key)

    def scalar_or_gradient(v: Any, where: str) -> None:
        if isinstance(v, list):
            if not v:
                fail(f"{where}an empty list is neither a value nor a gradient")
            for e in v:
                if isinstance(e, (list, Mapping)):
                    fail(f"{where}a gradient holds only scalars, got {e!r}")
                scalar(e, where)
        else:
            scalar(v, where)

    def entry(e: Any, i: int) -> None:
        where = f"filter entry {i}: "
        if not isinstance(e, Mapping):
            fail(f"{where}expected a {{filter, value}} mapping, got {e!r}")
        extra = set(e) - FILTER_KEYS
        if extra:
            what = "has no 'filter', so it matches every tensor" if "filter" not in e else "keeps its filter"
            ignored.append(f"{where}unknown key(s) {sorted(extra)} (allowed: filter, value) ignored, as mergekit "
                           f"ignores them; the entry {what}")
        if "value" not in e:
            fail(f"{where}missing 'value'")
        f = e.get("filter")
        if f is not None and not isinstance(f, str):
            fail(f"{where}'filter' must be a string, got {f!r}")
        if isinstance(e["value"], Mapping):
            fail(f"{where}filters do not nest")
        scalar_or_gradient(e["value"], where)

    if isinstance(value, Mapping):
        entry(value, 0)
    elif isinstance(value, list) and value and any(isinstance(e, Mapping) for e in value):
        for i, e in enumerate(value):
            entry(e, i)
    else:
        scalar_or_gradient(value, "")
    return ignored


def resolve_all(spec: dict, chain: tuple[dict, ...], job, tensor: str) -> dict:
    """Per-tensor value of every parameter in ``spec`` (name → the method's default) for tensor
    ``tensor`` of ``job`` (a plan TensorJob: its layer and span): the first of ``chain`` (model entry,
    then slice, then the stage's ``parameters``) whose setting applies to this tensor — a filter list that
    matches nothing falls through to the next, as in mergekit — else the default. The one function the
    planner's checks and the evaluator resolve parameters with."""
    from ..methods import PARAM_KINDS

    out = {}
    for key, default in spec.items():
        value = None
        for c in chain:
            if key in c:
                value = resolve(c[key], tensor, job.layer, job.span, kind=PARAM_KINDS.get(key), key=key)
                if value is not None:
                    break
        out[key] = default if value is None else value
    return out

"""Per-tensor parameter resolution: mergekit's scalar / gradient / filter forms, values worked by hand.

Layer positions follow mergekit's planner: layer k of n has t = k/(n−1) (t = 1 if n = 1), and tensors
outside the layers (embeddings, final norm, lm_head) use t = 0.
"""
from __future__ import annotations

import pytest

from ggmerge.errors import GGMergeError
from ggmerge.recipe.params import coerce, layer_position, resolve, validate

Q = "model.layers.{}.self_attn.q_proj.weight"
UP = "model.layers.{}.mlp.up_proj.weight"


def test_scalar_is_the_same_everywhere():
    for name, layer in ((Q.format(0), 0), ("model.embed_tokens.weight", None), ("lm_head.weight", None)):
        assert resolve(0.5, name, layer, 32) == 0.5
        assert resolve(True, name, layer, 32) is True


def test_layer_position():
    assert layer_position(None, 32) == 0.0
    assert layer_position(0, 32) == 0.0
    assert layer_position(31, 32) == 1.0
    assert layer_position(0, 1) == 1.0  # a one-layer slice sits at the END of any gradient


def test_two_point_gradient_first_middle_last():
    g = [0.0, 1.0]
    assert resolve(g, Q.format(0), 0, 32) == 0.0
    assert resolve(g, Q.format(31), 31, 32) == 1.0
    assert resolve(g, Q.format(15), 15, 32) == pytest.approx(15 / 31, abs=1e-15)


def test_multi_point_gradient_by_hand():
    g = [0.0, 1.0, 0.5, 0.2]  # 4 anchors spread over 7 layers: anchor j sits at layer 2j
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 3: 0.75, 4: 0.5, 5: 0.35, 6: 0.2}
    for layer, value in expected.items():
        assert resolve(g, UP.format(layer), layer, 7) == pytest.approx(value, abs=1e-12), layer


def test_layerless_tensors_take_the_first_value():
    g = [0.1, 0.9]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert resolve(g, name, None, 32) == 0.1
    # and a one-layer slice takes the last one
    assert resolve(g, UP.format(0), 0, 1) == 0.9


def test_integer_gradient_interpolates_to_float():
    assert resolve([0, 1], Q.format(1), 1, 3) == 0.5


def test_discrete_gradients_pick_by_position():
    g = [True, False]
    assert resolve(g, Q.format(0), 0, 4) is True
    assert resolve(g, Q.format(2), 2, 4) is True  # int(2/3 · 1) = 0
    assert resolve(g, Q.format(3), 3, 4) is False
    assert resolve(["a", "b", "c"], Q.format(2), 2, 4, kind=str) == "b"  # int(2/3 · 2) = 1


def test_filters_first_match_wins():
    setting = [
        {"filter": "self_attn", "value": 0.3},
        {"filter": "mlp", "value": [0.0, 1.0]},
        {"value": 0.7},
    ]
    assert resolve(setting, Q.format(5), 5, 11) == 0.3
    assert resolve(setting, UP.format(5), 5, 11) == pytest.approx(0.5)
    assert resolve(setting, UP.format(10), 10, 11) == 1.0
    assert resolve(setting, "model.embed_tokens.weight", None, 11) == 0.7
    assert resolve(setting, "model.layers.5.input_layernorm.weight", 5, 11) == 0.7
    order = [{"filter": "layers.1", "value": 1}, {"filter": "layers.1.mlp", "value": 2}]
    assert resolve(order, UP.format(1), 1, 32) == 1
    # plain substring semantics, as mergekit: "layers.1" also matches layer 10..19
    assert resolve(order, UP.format(12), 12, 32) == 1


def test_filter_forms():
    assert resolve({"filter": "mlp", "value": 2.0}, UP.format(0), 0, 2) == 2.0
    assert resolve({"filter": "*", "value": 3.0}, "lm_head.weight", None, 2) == 3.0
    # no match: None, so the caller falls back to the next scope / the default
    assert resolve([{"filter": "mlp", "value": 1.0}], Q.format(0), 0, 2) is None
    assert resolve({"filter": "mlp", "value": 1.0}, Q.format(0), 0, 2) is None


def test_kind_coercion():
    assert resolve("1e-3", Q.format(0), 0, 2, kind=float) == 0.001  # YAML reads 1e-3 as text
    assert resolve(["1e-3", "3e-3"], Q.format(1), 1, 3, kind=float) == pytest.approx(2e-3)
    assert resolve("1e-3", Q.format(0), 0, 2) == "1e-3"  # no kind: untouched
    assert resolve(1, Q.format(0), 0, 2, kind=float) == 1.0
    assert resolve("yes", Q.format(0), 0, 2, kind=bool) is True
    assert resolve(0, Q.format(0), 0, 2, kind=bool) is False
    assert coerce(4.0, int) == 4
    with pytest.raises(GGMergeError) as e:
        resolve("abc", Q.format(0), 0, 2, kind=float, key="weight")
    assert e.value.key == "weight"
    for bad, kind in ((True, float), (2, bool), ("maybe", bool), (0.5, int)):
        with pytest.raises(GGMergeError):
            coerce(bad, kind)


@pytest.mark.parametrize("value", [
    0.5, "1e-3", [0.0, 0.5, 1.0], {"filter": "mlp", "value": 0.3},
    [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}],
])
def test_validate_accepts_the_forms(value):
    validate(value, key="weight", kind=float)


def test_validate_bool_forms():
    validate(True, key="normalize", kind=bool)
    validate([True, False], key="normalize", kind=bool)
    validate([{"filter": "mlp", "value": "yes"}, {"value": 0}], key="normalize", kind=bool)
    with pytest.raises(GGMergeError, match="expected a bool"):
        validate(0.5, key="normalize", kind=bool)
    with pytest.raises(GGMergeError, match="expected a float"):
        validate(True, key="weight", kind=float)


def test_validate_reports_what_mergekit_drops():
    # an unknown key of a filter entry is dropped by mergekit's pydantic model: reported, not refused
    ignored = validate({"filter": "mlp", "value": 1, "weight": 2}, key="density", kind=float)
    assert len(ignored) == 1 and "unknown key(s) ['weight']" in ignored[0] and "keeps its filter" in ignored[0]
    assert validate([{"pattern": "mlp", "value": 1}], key="density", kind=float)[0].endswith(
        "the entry has no 'filter', so it matches every tensor")
    assert validate(0.5, key="density", kind=float) == []


@pytest.mark.parametrize("value, why", [
    (None, "no value"),
    ([], "empty list"),
    ([[0.0, 1.0]], "only scalars"),
    ({"filter": "mlp"}, "missing 'value'"),
    ({"filter": 3, "value": 1}, "must be a string"),
    ({"value": {"filter": "mlp", "value": 1}}, "do not nest"),
    ([{"value": 1}, 0.5], "mapping"),
    ("abc", "expected a float"),
    (float("nan"), "finite"),
])
def test_validate_rejects(value, why):
    with pytest.raises(GGMergeError, match=why) as e:
        validate(value, key="density", kind=float)
    assert e.value.key == "density"

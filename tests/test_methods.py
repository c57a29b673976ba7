"""Merge methods against their closed forms, computed independently here on tiny hand-built tensors.

Expected values come from the published formulas (and mergekit 0.1.5's documented defaults), written
out element by element in plain Python floats, never by calling the code under test twice.
tools/mergekit_compare.py checks the same functions against mergekit itself on tiny models.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ggmerge.errors import GGMergeError
from ggmerge.methods import METHODS, REQUIRED, get_method, seeded_generator
from ggmerge.methods import sparsify as sp
from ggmerge.methods.slerp import slerp_vectors

def f32(rows):
    return torch.tensor(rows, dtype=torch.float32)


# 4×3 hand-chosen tensors (the seed's chat-vector stage: B = Mistral base, A = Antler,
# I = Instruct, R = an RP model)
B = f32([[0.10, -0.20, 0.30], [0.00, 0.50, -0.50], [1.00, -1.00, 0.25], [0.75, 0.00, -0.125]])
A = f32([[0.15, -0.10, 0.20], [0.05, 0.40, -0.55], [1.10, -0.90, 0.20], [0.70, 0.10, -0.100]])
I = f32([[0.12, -0.25, 0.35], [-0.02, 0.55, -0.45], [0.95, -1.05, 0.30], [0.80, -0.05, -0.150]])
R = f32([[0.05, -0.18, 0.28], [0.03, 0.45, -0.60], [1.02, -0.97, 0.22], [0.77, 0.02, -0.130]])


def elementwise(fn, *tensors):
    """Apply a Python-float closed form element by element (float64), back to float32."""
    flat = [t.reshape(-1).tolist() for t in tensors]
    return torch.tensor([fn(*vals) for vals in zip(*flat)], dtype=torch.float32).reshape(tensors[0].shape)


# ---------------------------------------------------------------------------------------------
# defaults and the table


def test_defaults_match_mergekit_registry():
    # mergekit 0.1.5 merge_methods/registry.py: (consensus, sparsify, normalize, rescale)
    expected = {
        "task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
        "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
        "della": (True, True), "della_linear": (False, True),
    }
    for name, (normalize, rescale) in expected.items():
        m = METHODS[name]
        assert m.params == {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
        assert m.model_params["weight"] is REQUIRED and m.model_params["density"] == 1.0
        assert m.requires_base
    assert METHODS["breadcrumbs"].model_params["gamma"] == 0.01
    assert METHODS["della"].model_params["epsilon"] == 0.15
    assert METHODS["linear"].params == {"normalize": True} and METHODS["linear"].base_is_model
    assert METHODS["model_stock"].params == {"filter_wise": False} and METHODS["model_stock"].min_models == 2
    assert METHODS["slerp"].params == {"t": REQUIRED} and METHODS["slerp"].max_models == 1
    assert {n for n, m in METHODS.items() if m.uses_random} == {"dare_ties", "dare_linear", "della", "della_linear",
                                                                 "arcee_fusion"}


def test_unknown_method_suggests():
    with pytest.raises(GGMergeError, match="did you mean 'ties'") as e:
        get_method("tie")
    assert e.value.key == "merge_method"


def test_missing_required_parameter_names_key_and_tensor():
    with pytest.raises(GGMergeError) as e:
        METHODS["ties"](B, [A], [{}], tensor="model.layers.0.mlp.up_proj.weight")
    assert e.value.key == "weight" and e.value.tensor == "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(GGMergeError) as e:
        METHODS["slerp"](B, [A], [{}], {})
    assert e.value.key == "t"


def test_input_counts_are_checked():
    with pytest.raises(GGMergeError, match="base_model"):
        METHODS["ties"](None, [A], [{"weight": 1}])
    with pytest.raises(GGMergeError, match="at least 2"):
        METHODS["model_stock"](B, [A], [{}])
    with pytest.raises(GGMergeError, match="at most 1"):
        METHODS["slerp"](B, [A, I], [{}, {}], {"t": 0.5})


# ---------------------------------------------------------------------------------------------
# task arithmetic family


def test_task_arithmetic_chat_vector_stage():
    # new_model = Antler + 0.8 (Instruct − Mistral) + 0.8 (target − Mistral), as the seed states it,
    # expressed as task_arithmetic on base Mistral with weights 1, 0.8, 0.8 (normalize defaults False)
    out = METHODS["task_arithmetic"](B, [A, I, R], [{"weight": 1.0}, {"weight": 0.8}, {"weight": 0.8}])
    expected = elementwise(lambda a, i, r, b: a + 0.8 * (i - b) + 0.8 * (r - b), A, I, R, B)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_task_arithmetic_normalize_and_lambda():
    out = METHODS["task_arithmetic"](B, [A, I], [{"weight": 0.3}, {"weight": 0.9}],
                                     {"normalize": True, "lambda": 2.0})
    expected = elementwise(lambda a, i, b: b + 2.0 * (0.3 * (a - b) + 0.9 * (i - b)) / 1.2, A, I, B)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def ties_reference(base, models, weights, normalize):
    """TIES merge with consensus "sum", element by element (no trimming)."""

    def one(b, *xs):
        wd = [w * (x - b) for w, x in zip(weights, xs)]
        s = sum(wd)
        elected = 1 if s >= 0 else -1
        keep = [i for i, d in enumerate(wd) if d != 0 and math.copysign(1, d) == elected]
        mixed = sum(wd[i] for i in keep)
        div = sum(weights[i] for i in keep) or 1.0
        return b + (mixed / div if normalize else mixed)

    return elementwise(one, base, *models)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_sign_election_and_disjoint_mean(normalize):
    models, weights = [A, I, R], [1.0, 0.5, 0.7]
    out = METHODS["ties"](B, models, [{"weight": w} for w in weights], {"normalize": normalize})
    torch.testing.assert_close(out, ties_reference(B, models, weights, normalize), rtol=0, atol=1e-6)


def test_ties_hand_values():
    base = f32([0.0, 0.0, 0.0, 0.0])
    m1 = f32([2.0, 1.0, -3.0, 0.0])
    m2 = f32([-1.0, 1.0, 1.0, 0.0])
    out = METHODS["ties"](base, [m1, m2], [{"weight": 0.5}, {"weight": 1.0}])
    # element 0: weighted 1, −1 → sum 0 elects +; only m1 agrees: 1 / 0.5 = 2
    # element 1: 0.5, 1 agree: (0.5 + 1) / 1.5 = 1
    # element 2: −1.5, 1 → sum −0.5 elects −; m1 only: −1.5 / 0.5 = −3
    # element 3: nobody moves: divisor 0 → 1, result 0
    assert out.tolist() == [2.0, 1.0, -3.0, 0.0]
    raw = METHODS["ties"](base, [m1, m2], [{"weight": 0.5}, {"weight": 1.0}], {"normalize": False})
    assert raw.tolist() == [1.0, 1.5, -1.5, 0.0]


def test_ties_trims_by_magnitude_before_election():
    base = torch.zeros(6)
    m1 = f32([0.1, -5.0, 0.2, 4.0, -0.3, 3.0])  # density 0.5 keeps −5, 4, 3
    m2 = f32([1.0, 2.0, -0.1, -0.2, 0.5, 0.05])  # keeps 1, 2, 0.5
    out = METHODS["ties"](base, [m1, m2], [{"weight": 1, "density": 0.5}] * 2)
    trimmed1 = [0, -5.0, 0, 4.0, 0, 3.0]
    trimmed2 = [1.0, 2.0, 0, 0, 0.5, 0]
    expected = ties_reference(base, [f32(trimmed1), f32(trimmed2)], [1.0, 1.0], True)
    assert out.tolist() == expected.tolist() == [1.0, -5.0, 0.0, 4.0, 0.5, 3.0]


def test_int8_mask_changes_nothing():
    mp = [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.5}]
    a = METHODS["ties"](B, [A, I], mp, {"int8_mask": True})
    b = METHODS["ties"](B, [A, I], mp, {"int8_mask": False})
    assert torch.equal(a, b)


def test_dare_density_one_is_task_arithmetic():
    mp = [{"weight": 0.5, "density": 1.0}, {"weight": 0.8, "density": 1.0}]
    ta = METHODS["task_arithmetic"](B, [A, I], mp)
    assert torch.equal(METHODS["dare_linear"](B, [A, I], mp, gen=seeded_generator(1, "x")), ta)
    ties_like = ties_reference(B, [A, I], [0.5, 0.8], normalize=False)
    torch.testing.assert_close(METHODS["dare_ties"](B, [A, I], mp, gen=seeded_generator(1, "x")),
                               ties_like, rtol=0, atol=1e-6)


def test_dare_needs_generator():
    with pytest.raises(ValueError, match="generator"):
        METHODS["dare_ties"](B, [A], [{"weight": 1.0, "density": 0.5}])


def _big(seed=0, n=200_000):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    model = base + torch.randn(n, generator=g) * 0.01 + 1e-3  # no exactly-zero delta
    return base, model


def test_dare_mask_fraction_is_density():
    base, model = _big()
    density = 0.3
    out = METHODS["dare_linear"](base, [model], [{"weight": 1.0, "density": density}], {"rescale": False},
                                 gen=seeded_generator(7, "t"))
    kept = (out != base).double().mean().item()
    sigma = math.sqrt(density * (1 - density) / base.numel())
    assert abs(kept - density) < 5 * sigma
    # kept entries are the model's own values, dropped ones the base's
    delta = out - base
    on = delta != 0
    torch.testing.assert_close(out[on], model[on], rtol=0, atol=1e-6)


def test_dare_rescale_keeps_l1_norm():
    base, model = _big(1)
    # the seed's last stage: dare_ties, one model, density 0.7, weight 0.5
    out = METHODS["dare_ties"](base, [model], [{"weight": 0.5, "density": 0.7}], gen=seeded_generator(3, "w"))
    delta = model - base
    got = (out - base).abs().sum().item()
    assert got == pytest.approx(0.5 * delta.abs().sum().item(), rel=1e-4)
    # and every kept entry is scaled by the same factor L1(delta) / L1(kept)
    kept = (out - base) != 0
    factor = delta.abs().sum() / delta[kept].abs().sum()
    # (atol: out − base cancels; |base| ≤ ~5 has a float32 ulp of ~5e-7)
    torch.testing.assert_close((out - base)[kept], 0.5 * delta[kept] * factor, rtol=1e-4, atol=1e-6)


def test_dare_is_reproducible_per_tensor_name():
    base, model = _big(2, 5000)
    mp = [{"weight": 1.0, "density": 0.5}]
    run = lambda seed, name: METHODS["dare_ties"](base, [model], mp, gen=seeded_generator(seed, name))
    a = run(42, "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(a, run(42, "model.layers.0.mlp.up_proj.weight"))
    assert not torch.equal(a, run(42, "model.layers.1.mlp.up_proj.weight"))
    assert not torch.equal(a, run(43, "model.layers.0.mlp.up_proj.weight"))


def test_seeded_generator_independent_of_global_rng():
    torch.manual_seed(0)
    a = torch.rand(8, generator=seeded_generator(5, "n"))
    torch.manual_seed(123)
    torch.rand(100)
    assert torch.equal(a, torch.rand(8, generator=seeded_generator(5, "n")))


def test_breadcrumbs_removes_top_and_bottom():
    # 20 distinct magnitudes 1..20 at scrambled positions with mixed signs
    mags = [7, 19, 3, 12, 1, 16, 9, 20, 5, 14, 2, 11, 18, 6, 13, 4, 17, 8, 15, 10]
    delta = f32([m * (-1) ** i for i, m in enumerate(mags)])
    base = torch.zeros(20)
    out = METHODS["breadcrumbs"](base, [delta], [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    # keep int(0.5·20) = 10 after dropping int(0.1·20) = 2 largest and 20 − 10 − 2 = 8 smallest
    expected = [d if 9 <= abs(d) <= 18 else 0.0 for d in delta.tolist()]
    assert out.tolist() == expected
    # density + gamma > 1: the outlier cut shrinks so 19 survive (only the largest goes)
    out = METHODS["breadcrumbs"](base, [delta], [{"weight": 1.0, "density": 0.95, "gamma": 0.1}])
    assert out.tolist() == [d if abs(d) <= 19 else 0.0 for d in delta.tolist()]


def test_breadcrumbs_ties_is_trim_then_ties():
    mp = [{"weight": 1.0, "density": 0.5, "gamma": 0.1}, {"weight": 0.5, "density": 0.5, "gamma": 0.1}]
    out = METHODS["breadcrumbs_ties"](B, [A, I], mp)
    t1 = sp.magnitude_outliers(A - B, 0.5, 0.1)
    t2 = sp.magnitude_outliers(I - B, 0.5, 0.1)
    expected = ties_reference(torch.zeros_like(B), [t1, t2], [1.0, 0.5], normalize=False) + B
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_della_probabilities_are_magnitude_ranked():
    row = f32([[0.3, -0.1, 0.5, -0.2, 0.4]])  # ranks 3, 1, 5, 2, 4 of 5
    p = sp.della_probabilities(row, density=0.5, epsilon=0.1)
    # rank r of n maps to density − ε + 2ε (r − 1)/(n − 1)
    expected = [0.5 - 0.1 + 0.2 * (r - 1) / 4 for r in (3, 1, 5, 2, 4)]
    torch.testing.assert_close(p, f32([expected]), rtol=0, atol=1e-7)
    # 1-D tensors are one row
    torch.testing.assert_close(sp.della_probabilities(row[0], 0.5, 0.1), f32([expected]), rtol=0, atol=1e-7)


def test_della_keep_frequency_follows_rank():
    n_rows, n = 4000, 5
    g = torch.Generator().manual_seed(0)
    delta = torch.rand(n_rows, n, generator=g) + 0.01
    out = sp.della_magprune(delta, 0.5, 0.2, seeded_generator(0, "d"))
    rank = delta.argsort(dim=1).argsort(dim=1)  # 0 = smallest
    for r, expected in enumerate([0.3, 0.4, 0.5, 0.6, 0.7]):
        freq = (out[rank == r] != 0).double().mean().item()
        assert abs(freq - expected) < 5 * math.sqrt(expected * (1 - expected) / n_rows), (r, freq)


def test_della_density_one_is_ties_and_epsilon_checked():
    mp = [{"weight": 1.0}, {"weight": 0.6}]
    gen = seeded_generator(0, "x")
    assert torch.equal(METHODS["della"](B, [A, I], mp, gen=gen), METHODS["ties"](B, [A, I], mp))
    with pytest.raises(GGMergeError, match="epsilon") as e:
        METHODS["della"](B, [A], [{"weight": 1.0, "density": 0.1, "epsilon": 0.15}], gen=gen)
    assert e.value.key == "epsilon"


# ---------------------------------------------------------------------------------------------
# linear, model_stock, slerp, nuslerp, passthrough


def test_linear_weighted_mean():
    out = METHODS["linear"](None, [A, I, R], [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}])
    expected = elementwise(lambda a, i, r: (a + 2 * i + 0.5 * r) / 3.5, A, I, R)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    raw = METHODS["linear"](None, [A, I], [{"weight": 0.3}, {"weight": 0.3}], {"normalize": False})
    torch.testing.assert_close(raw, elementwise(lambda a, i: 0.3 * a + 0.3 * i, A, I), rtol=0, atol=1e-6)
    with pytest.raises(GGMergeError, match="sum to 0"):
        METHODS["linear"](None, [A, I], [{"weight": 1.0}, {"weight": -1.0}])


def _at_angle(c: float, scale: float = 1.0):
    """Unit x-axis and a vector at cosine c from it."""
    return f32([1.0, 0.0]), f32([c * scale, math.sqrt(1 - c * c) * scale])


@pytest.mark.parametrize("c", [0.2, 0.6, -0.3])
def test_model_stock_t_formula(c):
    base = f32([0.5, -0.5])
    d1, d2 = _at_angle(c, 2.0)
    out = METHODS["model_stock"](base, [base + d1, base + d2], [{}, {}])
    t = 2 * c / (1 + c)
    avg = [b + (x + y) / 2 for b, x, y in zip(base.tolist(), d1.tolist(), d2.tolist())]
    expected = [t * a + (1 - t) * b for a, b in zip(avg, base.tolist())]
    torch.testing.assert_close(out, f32(expected), rtol=0, atol=1e-6)


def test_model_stock_three_models_mean_cosine():
    base = torch.zeros(3)
    ds = [f32([1.0, 0, 0]), f32([0, 2.0, 0]), f32([3.0, 0, 3.0])]
    # pairwise cosines 0, 1/√2, 0 → mean √2/6; t = 3c / (1 + 2c)
    c = math.sqrt(2) / 6
    t = 3 * c / (1 + 2 * c)
    out = METHODS["model_stock"](base, ds, [{}] * 3)
    torch.testing.assert_close(out, f32([t * 4 / 3, t * 2 / 3, t * 1.0]), rtol=0, atol=1e-6)


def test_model_stock_filter_wise_per_row_and_singular():
    base = torch.zeros(2, 2)
    m1 = f32([[1.0, 0.0], [1.0, 0.0]])
    m2 = f32([[0.6, 0.8], [-1.0, 0.0]])  # row 0: cos 0.6; row 1: cos −1 → 1 + (−1) = 0 singular → t = 0
    out = METHODS["model_stock"](base, [m1, m2], [{}, {}], {"filter_wise": True})
    t0 = 2 * 0.6 / 1.6
    torch.testing.assert_close(out, f32([[t0 * 0.8, t0 * 0.4], [0.0, 0.0]]), rtol=0, atol=1e-6)
    # whole-tensor: one cosine over the flattened offsets
    flat = METHODS["model_stock"](base, [m1, m2], [{}, {}])
    c = (0.6 - 1.0) / (math.sqrt(2) * math.sqrt(2))
    t = 2 * c / (1 + c)
    torch.testing.assert_close(flat, t * (m1 + m2) / 2, rtol=0, atol=1e-6)


def slerp_reference(t, v0, v1):
    a, b = v0.reshape(-1).tolist(), v1.reshape(-1).tolist()
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    dot = sum(x * y for x, y in zip(a, b)) / (na * nb)
    if abs(dot) > 0.9995:
        return f32([(1 - t) * x + t * y for x, y in zip(a, b)]).reshape(v0.shape)
    th = math.acos(dot)
    ca, cb = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
    return f32([ca * x + cb * y for x, y in zip(a, b)]).reshape(v0.shape)


def test_slerp_endpoints_midpoint_and_colinear():
    s = METHODS["slerp"]
    torch.testing.assert_close(s(B, [A], [{}], {"t": 0.0}), B, rtol=0, atol=1e-6)
    torch.testing.assert_close(s(B, [A], [{}], {"t": 1.0}), A, rtol=0, atol=1e-6)
    mid = s(f32([1.0, 0.0]), [f32([0.0, 1.0])], [{}], {"t": 0.5})
    torch.testing.assert_close(mid, f32([math.sqrt(0.5), math.sqrt(0.5)]), rtol=0, atol=1e-7)
    for t in (0.25, 0.5, 0.9):
        torch.testing.assert_close(s(B, [R], [{}], {"t": t}), slerp_reference(t, B, R), rtol=0, atol=1e-6)
    # colinear (same direction, different length): plain lerp, not the norm-preserving arc
    v = f32([1.0, 2.0, 3.0])
    assert s(v, [2 * v], [{}], {"t": 0.5}).tolist() == (1.5 * v).tolist()


def test_slerp_orthogonal_scaled():
    v0, v1 = f32([3.0, 0.0]), f32([0.0, 1.0])
    out = slerp_vectors(1 / 3, v0, v1)  # θ = 90°: coefficients sin(60°), sin(30°)
    torch.testing.assert_close(out, f32([3 * math.sin(math.pi / 3), math.sin(math.pi / 6)]), rtol=0, atol=1e-6)


def test_nuslerp_with_base_interpolates_task_vectors():
    base = f32([[1.0, 1.0], [0.0, 0.0]])
    m1 = base + f32([[2.0, 0.0], [1.0, 0.0]])
    m2 = base + f32([[0.0, 2.0], [0.0, 1.0]])
    out = METHODS["nuslerp"](base, [m1, m2], [{"weight": 1.0}, {"weight": 1.0}])
    # flattened task vectors [2,0,1,0] and [0,2,0,1] are orthogonal with equal norms: t = 0.5
    k = math.sin(math.pi / 4) / 1.0
    torch.testing.assert_close(out, base + k * f32([[2.0, 2.0], [1.0, 1.0]]), rtol=0, atol=1e-6)
    # row-wise over the last dim, weights 1:3 → t = 0.75, each row 90° apart
    rows = METHODS["nuslerp"](None, [m1 - base, m2 - base], [{"weight": 1.0}, {"weight": 3.0}],
                              {"nuslerp_flatten": False})
    ca, cb = math.sin(0.25 * math.pi / 2), math.sin(0.75 * math.pi / 2)
    torch.testing.assert_close(rows, f32([[2 * ca, 2 * cb], [ca, cb]]), rtol=0, atol=1e-6)


def test_passthrough_scale():
    p = METHODS["passthrough"]
    assert torch.equal(p(None, [A], [{}]), A)
    torch.testing.assert_close(p(None, [A], [{"scale": 0.5}]), A * 0.5, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# sparsify invariants

# subnormals excluded: their rescaled ratios are legitimately imprecise
deltas = st.lists(st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=60)
densities = st.floats(0.01, 0.99)


@settings(max_examples=60, deadline=None, database=None)  # write nothing outside tmp
@given(deltas, densities)
def test_magnitude_keeps_the_k_largest(values, density):
    d = f32(values)
    out = sp.magnitude(d, density)
    k = max(1, int(density * d.numel()))
    kept = torch.zeros(d.numel(), dtype=torch.bool)
    kept[torch.argsort(d.abs(), descending=True)[:k]] = True
    assert torch.equal(out, torch.where(kept, d, 0.0))
    dropped = d.abs()[~kept]
    if dropped.numel():
        assert d.abs()[kept].min() >= dropped.max()


@settings(max_examples=60, deadline=None, database=None)  # write nothing outside tmp
@given(deltas, densities, st.floats(0, 0.3))
def test_magnitude_outliers_keeps_a_middle_band(values, density, gamma):
    d = f32(values)
    out = sp.magnitude_outliers(d, density, gamma)
    n = d.numel()
    kept = out != 0
    nonzero_kept = int(((d != 0) & kept).sum())
    assert int(kept.sum()) <= int(density * n)
    assert nonzero_kept >= int(density * n) - int((d == 0).sum())
    assert torch.equal(out[kept], d[kept])
    # every kept magnitude lies between the dropped small ones and the dropped outliers
    order = torch.sort(d.abs()).indices
    n_bot = max(0, n - int(density * n) - int(gamma * n))
    band = torch.zeros(n, dtype=torch.bool)
    band[order[n_bot: n_bot + int(density * n)]] = True
    assert torch.equal(out, torch.where(band, d, 0.0))


@settings(max_examples=40, deadline=None, database=None)
@given(deltas, densities, st.integers(0, 2**31))
def test_random_sparsifiers_only_drop_and_rescale_uniformly(values, density, seed):
    d = f32(values)
    for fn in (lambda r, g: sp.bernoulli(d, density, g, r),
               lambda r, g: sp.della_magprune(d, density, min(density, 1 - density) / 2, g, r)):
        plain = fn(False, seeded_generator(seed, "s"))
        assert torch.all((plain == 0) | (plain == d))
        scaled = fn(True, seeded_generator(seed, "s"))  # same draws
        kept = plain != 0
        assert torch.equal(scaled == 0, ~kept)
        if kept.any() and plain.abs().sum() >= sp.RESCALE_EPS:
            assert scaled.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)
            ratio = scaled[kept] / d[kept]
            torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-6, atol=0)


def test_sparsify_edges():
    d = f32([1.0, -2.0, 3.0])
    g = seeded_generator(0, "e")
    for out in (sp.magnitude(d, 1.0), sp.magnitude_outliers(d, 1.0, 0.1), sp.bernoulli(d, 1.0, g),
                sp.della_magprune(d, 1.0, 0.1, g)):
        assert torch.equal(out, d)
    assert torch.equal(sp.magnitude(d, 0.0), torch.zeros(3))
    assert sp.magnitude(d, 0.01).tolist() == [0.0, 0.0, 3.0]  # a positive density keeps one
    assert torch.equal(sp.della_magprune(d, 0.0, 0.1, g), torch.zeros(3))
    # the masked L1 rescale skips all-zero results instead of dividing by zero
    assert torch.equal(sp.rescale_l1(d, torch.zeros(3), True), torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# SCE, Karcher, Arcee Fusion (mergekit 0.1.5's newer methods; tools/mergekit_compare.py shows them
# bit-identical to mergekit's float32 runs)


def sce_reference(base, models, topk):
    """SCE element by element in float64: variance selection, mean-square weights, TIES sign election."""
    n = base.numel()
    b = base.reshape(-1).tolist()
    tvs = [[x - y for x, y in zip(m.reshape(-1).tolist(), b)] for m in models]
    if topk < 1:
        var = []
        for j in range(n):
            col = [tv[j] for tv in tvs]
            mu = sum(col) / len(col)
            var.append(sum((c - mu) ** 2 for c in col) / len(col))
        k = int(sum(v != 0 for v in var) * topk)
        keep = set(sorted(range(n), key=lambda j: -var[j])[:k])
        tvs = [[tv[j] if j in keep else 0.0 for j in range(n)] for tv in tvs]
    w = [sum(x * x for x in tv) / n for tv in tvs]
    w = [x / sum(w) for x in w]
    out = []
    for j in range(n):
        col = [tv[j] for tv in tvs]
        elected = 1 if sum(col) >= 0 else -1
        on = [i for i, c in enumerate(col) if c != 0 and math.copysign(1, c) == elected]
        num = sum(w[i] * col[i] for i in on)
        den = max(sum(w[i] for i in on), 1e-6)
        out.append(b[j] + num / den)
    return torch.tensor(out, dtype=torch.float32).reshape(base.shape)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.25])
def test_sce_closed_form(topk):
    out = METHODS["sce"](B, [A, I, R], [{}, {}, {}], {"select_topk": topk})
    torch.testing.assert_close(out, sce_reference(B, [A, I, R], topk), rtol=0, atol=1e-6)


def test_sce_hand_values():
    base = f32([0.0, 0.0, 0.0, 0.0])
    m1 = f32([2.0, 0.0, -2.0, 2.0])   # mean square 3
    m2 = f32([-1.0, 1.0, -1.0, 1.0])  # mean square 1: weights 3/4, 1/4
    out = METHODS["sce"](base, [m1, m2], [{}, {}])
    # elt 0: 2 − 1 > 0 elects +: m1 alone → 2; elt 1: m1's 0 has no sign: m2 alone → 1;
    # elt 2: both −: (¾·−2 + ¼·−1) / 1 = −1.75; elt 3: (¾·2 + ¼·1) = 1.75
    assert out.tolist() == [2.0, 1.0, -1.75, 1.75]
    # select_topk 0.25 keeps int(4·0.25) = 1 element, the one of largest variance across the models
    # (elt 0: 2.25; the others 0.25); the rest return to the base
    sel = METHODS["sce"](base, [m1, m2], [{}, {}], {"select_topk": 0.25})
    assert sel.tolist() == [2.0, 0.0, 0.0, 0.0]


def test_sce_base_alone_and_identical_models():
    assert torch.equal(METHODS["sce"](B, [], [], {}), B)
    # identical task vectors: any weights give the common vector back
    torch.testing.assert_close(METHODS["sce"](B, [A, A], [{}, {}]), A, rtol=0, atol=1e-7)


def test_karcher_on_a_circle_is_the_mean_angle_and_mean_norm():
    # on S¹ the Karcher mean of angles within a half circle is their arithmetic mean
    angles, norms = [0.1, 0.5, 1.2], [1.0, 2.0, 3.0]
    xs = [f32([r * math.cos(a), r * math.sin(a)]) for a, r in zip(angles, norms)]
    out = METHODS["karcher"](None, xs, [{}, {}, {}])
    expected = f32([2.0 * math.cos(0.6), 2.0 * math.sin(0.6)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_karcher_two_inputs_is_the_normalised_midpoint():
    out = METHODS["karcher"](None, [A, I], [{}, {}])
    na, ni = A.norm().item(), I.norm().item()
    mid = A / na + I / ni
    expected = mid / mid.norm() * (na + ni) / 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_karcher_zero_input_counts_only_in_the_norm():
    out = METHODS["karcher"](None, [A, torch.zeros_like(A)], [{}, {}])
    torch.testing.assert_close(out, A / 2, rtol=0, atol=1e-7)
    assert torch.equal(METHODS["karcher"](None, [A], [{}]), A)


def test_karcher_takes_the_base_as_an_input():
    assert METHODS["karcher"].base_is_model and METHODS["karcher"].params == {"max_iter": 10, "tol": 1e-5}


def arcee_fusion_reference(b, p):
    """Arcee Fusion in float64 Python: per-row KL of the softmaxes, index quantiles, IQR threshold."""
    rows_b = b.reshape(-1, b.shape[-1]).tolist()
    rows_p = p.reshape(-1, p.shape[-1]).tolist()
    imp = []
    for rb, rp in zip(rows_b, rows_p):
        def softmax(r):
            e = [math.exp(x - max(r)) for x in r]
            return [x / sum(e) + 1e-8 for x in e]
        sp, sb = softmax(rp), softmax(rb)
        kl = sum(x * math.log(x / y) for x, y in zip(sp, sb))
        imp += [abs(x - y) * kl for x, y in zip(rp, rb)]
    s = sorted(imp)
    q1, med, q3 = (s[int(q * (len(s) - 1))] for q in (0.25, 0.5, 0.75))
    thr = med + 1.5 * (q3 - q1)
    flat_b, flat_p = b.reshape(-1).tolist(), p.reshape(-1).tolist()
    out = [y + (x - y) if i >= thr else y for x, y, i in zip(flat_p, flat_b, imp)]
    return torch.tensor(out, dtype=torch.float32).reshape(b.shape), sum(i >= thr for i in imp)


def test_arcee_fusion_closed_form():
    g = torch.Generator().manual_seed(5)
    b = torch.randn(6, 16, generator=g)
    p = b + 0.1 * torch.randn(6, 16, generator=g) * (torch.rand(6, 16, generator=g) < 0.2)
    out = METHODS["arcee_fusion"](b, [p], [{}], gen=seeded_generator(0, "x"))
    expected, n_taken = arcee_fusion_reference(b, p)
    assert 0 < n_taken < b.numel()  # a real selection, neither all nor nothing
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # a 1-D tensor is one row
    out1 = METHODS["arcee_fusion"](b[0], [p[0]], [{}], gen=seeded_generator(0, "y"))
    torch.testing.assert_close(out1, arcee_fusion_reference(b[0], p[0])[0], rtol=0, atol=1e-6)


def test_arcee_fusion_needs_exactly_one_other_model():
    with pytest.raises(GGMergeError, match="at most 1"):
        METHODS["arcee_fusion"](B, [A, I], [{}, {}])
    with pytest.raises(GGMergeError, match="base_model"):
        METHODS["arcee_fusion"](None, [A], [{}])


def test_karcher_cycle_jump_changes_no_bit(monkeypatch):
    # tol 1e-12 is never reached in float32: the iteration cycles; jumping over the cycle must give the
    # bits of running all max_iter steps (the reference loop below is mergekit's, step by step)
    km = importlib.import_module("ggmerge.methods.karcher")

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(7, 5, generator=g) for _ in range(3)]
    alphas = [1 / 3] * 3
    for max_iter in (1, 2, 7, 50, 333):
        fast = km.karcher_mean(xs, alphas, max_iter, 1e-12)
        monkeypatch.setattr(km.hashlib, "blake2b", _NeverSeen)
        slow = km.karcher_mean(xs, alphas, max_iter, 1e-12)
        monkeypatch.undo()
        assert torch.equal(fast, slow), max_iter


class _NeverSeen:
    """A digest that is always new: disables the cycle jump."""
    n = 0

    def __init__(self, *a, **k):
        _NeverSeen.n += 1

    def digest(self):
        return _NeverSeen.n.to_bytes(8, "little")

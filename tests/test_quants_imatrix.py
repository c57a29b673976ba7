"""Importance-weighted quantizers against libggml: ``ggml_quantize_chunk(type, ..., imatrix)``.

With an imatrix llama-quantize runs other ggml code than without one (``quantize_row_*_impl``,
``make_qkx3_quants``, ``make_qp_quants``); IQ4_NL/IQ4_XS run ``quantize_row_iq4_nl_impl`` either way.
Every case of tests/test_quants_exact.py (zeros, constants, outliers, tiny, negative-only, ...) is
checked with several kinds of weights, including the degenerate ones an imatrix really holds
(all 1 for an unused expert, zeros for a column that never saw a non-zero activation).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
from ggmerge import libggml
from gguf import GGMLQuantizationType as QType
from test_quants_exact import CASES, _assert_same, _bf16, _rng

from ggmerge.convert.quants import quantize
from ggmerge.errors import GGMergeError

WEIGHTED = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.IQ4_NL, QType.IQ4_XS]
IQ4 = [QType.IQ4_NL, QType.IQ4_XS]


def _weights(kind: str, n: int) -> np.ndarray:
    r = _rng(20)
    f = np.float32
    if kind == "activations":  # mean squares of real-looking activations: skewed, a few huge columns
        w = (r.standard_normal(n) ** 2 * 0.3).astype(f)
        w[r.integers(0, n, 4)] *= 500
        return w
    if kind == "ones":
        return np.ones(n, f)
    if kind == "some_zero":
        w = r.random(n).astype(f)
        w[r.random(n) < 0.3] = 0
        w[:32] = 0  # one whole block with no weight
        return w
    if kind == "tiny":
        return (r.random(n) * 1e-30).astype(f)
    if kind == "huge":
        return (r.random(n) * 1e25).astype(f)
    raise ValueError(kind)


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bytes_match_libggml(qtype, case):
    x = CASES[case]
    w = _weights("activations", x.shape[-1])
    _assert_same(quantize(x, qtype, imatrix=w), libggml.ref_quantize(x, qtype, w), f"{qtype.name}/{case}")


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["ones", "some_zero", "tiny", "huge"])
@pytest.mark.parametrize("case", ["normal", "zeros", "constant", "one_huge_outlier", "all_negative",
                                  "sparse", "min_lost_in_packing"])
def test_degenerate_weights(qtype, kind, case):
    x = CASES[case]
    w = _weights(kind, x.shape[-1])
    _assert_same(quantize(x, qtype, imatrix=w), libggml.ref_quantize(x, qtype, w),
                 f"{qtype.name}/{kind}/{case}")


@pytest.mark.parametrize("qtype", IQ4, ids=lambda t: t.name)
@pytest.mark.parametrize("case", sorted(CASES))
def test_iq4_without_imatrix(qtype, case):
    """ggml_quantize_chunk(IQ4_*, imatrix=NULL): the same search, weights x*x."""
    x = CASES[case]
    _assert_same(quantize(x, qtype), libggml.ref_quantize(x, qtype), f"{qtype.name}/{case}")


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_realistic_matrix_two_threads(qtype):
    """bf16 weights with outlier channels, a 576-wide row (SmolLM2's hidden size: 32-block types
    only) or 1536-wide, rows cut into several chunks per thread."""
    r = _rng(4)
    n = 576 if qtype in (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.IQ4_NL) else 1536
    w = r.standard_normal((150, n)) * 0.02
    w[:, r.integers(0, n, 6)] *= 40
    x = _bf16(w.astype(np.float32))
    qw = _weights("activations", n)
    ref = libggml.ref_quantize(x, qtype, qw)
    _assert_same(quantize(x, qtype, imatrix=qw, threads=2), ref, f"{qtype.name}/2 threads")
    _assert_same(quantize(x, qtype, imatrix=qw, threads=1), ref, f"{qtype.name}/1 thread")


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.IQ4_XS, QType.Q5_0], ids=lambda t: t.name)
def test_experts_use_their_own_row(qtype):
    """A 3-D (experts, rows, cols) tensor with an (experts, cols) imatrix: expert e's rows are
    quantized with row e, as llama_tensor_quantize_impl does."""
    x = (_rng(6).standard_normal((3, 5, 512)) * 0.1).astype(np.float32)
    qw = np.stack([_weights(k, 512) for k in ("activations", "ones", "some_zero")])
    ours = quantize(x, qtype, imatrix=qw, threads=2)
    for e in range(3):
        _assert_same(ours[e], libggml.ref_quantize(x[e], qtype, qw[e]), f"{qtype.name}/expert {e}")


def test_imatrix_shape_errors_name_the_tensor():
    x = np.ones((4, 256), np.float32)
    with pytest.raises(GGMergeError, match="blk.0.x.*do not fit rows of 256"):
        quantize(x, QType.Q4_K, imatrix=np.ones(128, np.float32), tensor="blk.0.x")
    with pytest.raises(GGMergeError, match="2 experts"):
        quantize(x, QType.Q4_K, imatrix=np.ones((2, 256), np.float32), tensor="t")
    with pytest.raises(GGMergeError, match="NaN or infinite"):
        quantize(np.full((1, 256), np.nan, np.float32), QType.IQ4_XS, tensor="t")


def test_types_ggml_does_not_weight_ignore_the_imatrix():
    x = (_rng(7).standard_normal((3, 256))).astype(np.float32)
    for qtype in (QType.Q8_0, QType.F16, QType.BF16, QType.F32):
        assert np.array_equal(quantize(x, qtype, imatrix=np.ones(256, np.float32)), quantize(x, qtype))

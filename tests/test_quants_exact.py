"""ggmerge.convert.quants against libggml: the same bytes, for every type, on hard inputs.

The reference is ``ggml_quantize_chunk`` with no importance matrix from the libggml-base bundled in
llama-cpp-python (tests/libggml.py), i.e. what llama-quantize writes without ``--imatrix``.
"""
from __future__ import annotations

import importlib
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from ggmerge import libggml
except ImportError:  # llama-cpp-python absent: only the comparisons with libggml skip
    libggml = None
from ggmerge.convert.quants import block_info, can_quantize, dequantize, quantize
from ggmerge.convert.quants.ggml_float import fp16_value, nearest_int
from gguf import GGMLQuantizationType as QType

from ggmerge.errors import GGMergeError

#: the tests that compare with libggml's bytes
needs_libggml = pytest.mark.skipif(libggml is None, reason="the libggml reference needs llama-cpp-python")

K_TYPES = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]
LEGACY_TYPES = [QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]
FLOAT_TYPES = [QType.F32, QType.F16, QType.BF16]
ALL_TYPES = FLOAT_TYPES + LEGACY_TYPES + K_TYPES


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).float().numpy()


def _cases(n: int = 512) -> dict[str, np.ndarray]:
    """Named (rows, n) float32 inputs, each a way a port of the reference could go wrong."""
    r = _rng(1)
    f = np.float32
    c: dict[str, np.ndarray] = {}
    c["normal"] = r.standard_normal((8, n)).astype(f)
    c["student_t2"] = r.standard_t(2, (8, n)).astype(f)
    c["cauchy_clipped"] = np.clip(r.standard_cauchy((8, n)), -1e3, 1e3).astype(f)
    c["zeros"] = np.zeros((2, n), f)
    c["negative_zeros"] = np.full((2, n), -0.0, f)
    c["constant"] = np.full((2, n), 0.37, f)
    c["negative_constant"] = np.full((2, n), -1.5, f)
    out = r.standard_normal((4, n)).astype(f)
    out[np.arange(4), [0, 7, 100, n - 1]] = [1e6, -3e5, 7e7, -1e8]
    c["one_huge_outlier"] = out
    c["subnormal"] = (r.standard_normal((4, n)) * 1e-39).astype(f)
    c["deep_subnormal"] = (r.standard_normal((4, n)) * 1e-43).astype(f)
    c["tiny"] = (r.standard_normal((4, n)) * 1e-20).astype(f)
    c["large_1e30"] = (r.standard_normal((4, n)) * 1e30).astype(f)
    c["near_float_max"] = (r.uniform(-1, 1, (2, n)) * 3e38).astype(f)
    c["beyond_fp16"] = (r.standard_normal((4, n)) * 7e4).astype(f)
    c["all_positive"] = np.abs(r.standard_normal((4, n))).astype(f) + f(0.5)
    c["all_negative"] = -np.abs(r.standard_normal((4, n))).astype(f) - f(0.5)
    alt = r.standard_normal((4, n)).astype(f)
    alt[:, ::2] = np.abs(alt[:, ::2])
    alt[:, 1::2] = -np.abs(alt[:, 1::2])
    c["alternating_signs"] = alt
    c["halves_ties"] = (r.integers(-16, 17, (4, n)) * 0.5).astype(f)
    c["coarse_grid"] = (r.integers(-3, 4, (4, n)) * 0.1).astype(f)
    c["sparse"] = (r.standard_normal((4, n)) * (r.random((4, n)) < 0.05)).astype(f)
    c["per_block_scales"] = (r.standard_normal((4, n))
                             * np.repeat(10.0 ** r.uniform(-6, 6, (4, n // 16)), 16, axis=1)).astype(f)
    c["bf16_weights"] = _bf16((r.standard_normal((8, n)) * 0.02).astype(f))
    # A sub-block whose min is lost when mins are packed to 6 (Q4_K/Q5_K) or 4 (Q2_K) bits against a
    # huge neighbour: its levels (x + dm)/d land near -5e6, where ggml's nearest_int bit trick is
    # not rounding (rows 0-3 hit it in Q4_K/Q5_K, rows 4-7 in Q2_K)
    lost = r.uniform(-1, 1, (8, n)).astype(f)
    lost[:4, :32] = -4.1e6
    lost[:4, 32:64] = -2e4 + r.uniform(0, 0.02, (4, 32))
    lost[4:] *= f(0.01)
    lost[4:, :16] = -9e5
    lost[4:, 16:32] = -1e4 + r.uniform(0, 0.002, (4, 16))
    c["min_lost_in_packing"] = lost
    return c


CASES = _cases()


def _assert_same(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.dtype == np.uint8 and ours.shape == ref.shape, (what, ours.shape, ref.shape)
    if not np.array_equal(ours, ref):
        o, r = ours.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
        rows = np.flatnonzero((o != r).any(axis=1))
        byte = np.flatnonzero(o[rows[0]] != r[rows[0]])
        pytest.fail(f"{what}: {rows.size} rows differ from libggml; first row {rows[0]}, bytes {byte[:8]}")


@needs_libggml
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bytes_match_libggml(qtype, case):
    x = CASES[case]
    _assert_same(quantize(x, qtype), libggml.ref_quantize(x, qtype), f"{qtype.name}/{case}")


@needs_libggml
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 256), (7, 256), (3, 4096), (2, 3, 512)], ids=str)
def test_shapes(qtype, shape):
    x = (_rng(2).standard_normal(shape) * 0.05).astype(np.float32)
    ours = quantize(x, qtype)
    bs, ts = block_info(qtype)
    assert ours.shape == shape[:-1] + (shape[-1] // bs * ts,)
    ref = libggml.ref_quantize(x.reshape(-1, shape[-1]), qtype)
    _assert_same(ours.reshape(ref.shape), ref, f"{qtype.name}/{shape}")


@needs_libggml
@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_K, QType.Q6_K], ids=lambda t: t.name)
def test_input_layouts(qtype):
    """1-D rows, float64, and non-contiguous views all quantize the float32 values they hold."""
    x = (_rng(8).standard_normal((6, 512)) * 0.1).astype(np.float32)
    ref = libggml.ref_quantize(x, qtype)
    _assert_same(quantize(x[2], qtype), ref[2], "1-D")
    _assert_same(quantize(x.astype(np.float64), qtype), ref, "float64")
    _assert_same(quantize(np.asfortranarray(x), qtype), ref, "Fortran order")
    _assert_same(quantize(x[::2], qtype), ref[::2], "strided rows")


@needs_libggml
@pytest.mark.parametrize("qtype", LEGACY_TYPES, ids=lambda t: t.name)
def test_legacy_rows_not_multiple_of_256(qtype):
    x = _rng(3).standard_normal((5, 96)).astype(np.float32)
    _assert_same(quantize(x, qtype), libggml.ref_quantize(x, qtype), qtype.name)


@needs_libggml
@pytest.mark.parametrize("qtype", K_TYPES + LEGACY_TYPES, ids=lambda t: t.name)
def test_seeded_random_mixtures(qtype):
    """Many small random rows mixing the case generators per block (broad, cheap coverage)."""
    r = _rng(int(qtype))
    rows = []
    for _ in range(24):
        scale = 10.0 ** r.uniform(-8, 8)
        kind = r.integers(0, 5)
        if kind == 0:
            row = r.standard_normal(256)
        elif kind == 1:
            row = r.standard_t(r.uniform(0.7, 4), 256)
        elif kind == 2:
            row = r.integers(-8, 9, 256) * 0.25
        elif kind == 3:
            row = r.standard_normal(256) * (r.random(256) < r.uniform(0.01, 0.5))
        else:
            row = r.standard_normal(256) + r.uniform(-5, 5)
        rows.append(np.clip(row * scale, -1e37, 1e37))
    x = np.asarray(rows, dtype=np.float32)
    _assert_same(quantize(x, qtype), libggml.ref_quantize(x, qtype), qtype.name)


@needs_libggml
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_realistic_matrix(qtype):
    """A 128 x 4096 bf16-rounded weight matrix with a few outlier channels, as in real LLM layers."""
    r = _rng(4)
    w = r.standard_normal((128, 4096)) * 0.02
    w[:, r.integers(0, 4096, 6)] *= 40
    x = _bf16(w.astype(np.float32))
    _assert_same(quantize(x, qtype), libggml.ref_quantize(x, qtype), qtype.name)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_threads_do_not_change_bytes(qtype):
    x = (_rng(5).standard_normal((40, 512)) * 0.1).astype(np.float32)
    assert np.array_equal(quantize(x, qtype, threads=1), quantize(x, qtype, threads=3))


@needs_libggml
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_one_and_two_threads_give_libggml_bytes(qtype):
    """Big enough to be cut into many chunks (several per thread), with an odd number of
    super-blocks so that the kernels' last lane group is partial."""
    x = (_rng(9).standard_normal((97, 3328)) * 0.05).astype(np.float32)
    ref = libggml.ref_quantize(x, qtype)
    _assert_same(quantize(x, qtype, threads=1), ref, f"{qtype.name}/1 thread")
    _assert_same(quantize(x, qtype, threads=2), ref, f"{qtype.name}/2 threads")


@needs_libggml
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_4096_square_weight_matches_libggml(qtype):
    """A full 4096 x 4096 bf16-rounded weight matrix (a Mistral-7B attention projection's shape)."""
    r = _rng(10)
    w = (r.standard_normal((4096, 4096), dtype=np.float32) * np.float32(0.02))
    w[:, r.integers(0, 4096, 8)] *= 30
    x = _bf16(w)
    _assert_same(quantize(x, qtype, threads=2), libggml.ref_quantize(x, qtype), qtype.name)


# What comes back: dequantize is gguf-py's, checked against ggml's to_float, and the round trip is close.
# relative RMS error on N(0, 1) rows: about 1.2x what ggml's own bytes give (measured), so a codec
# that is exact on the hard cases but wrong on ordinary data still fails here
ROUND_TRIP_RMS = {QType.F32: 0.0, QType.F16: 2.6e-4, QType.BF16: 2e-3, QType.Q8_0: 0.0066, QType.Q6_K: 0.022,
                  QType.Q5_1: 0.046, QType.Q5_0: 0.053, QType.Q5_K: 0.044, QType.Q4_1: 0.097, QType.Q4_0: 0.105,
                  QType.Q4_K: 0.088, QType.Q3_K: 0.18, QType.Q2_K: 0.36}


@needs_libggml
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_round_trip(qtype):
    x = CASES["normal"]
    raw = quantize(x, qtype)
    back = dequantize(raw, qtype)
    assert back.shape == x.shape and back.dtype == np.float32
    np.testing.assert_array_equal(back, libggml.ref_dequantize(raw, qtype))
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2))
    assert rel <= ROUND_TRIP_RMS[qtype], rel
    if qtype != QType.F32:
        assert rel > 0


def test_block_info_and_can_quantize():
    assert block_info(QType.Q4_K) == (256, 144)
    assert block_info(QType.Q8_0) == (32, 34)
    assert all(can_quantize(t) for t in ALL_TYPES)
    assert not can_quantize(QType.Q8_K) and not can_quantize(QType.IQ2_XXS)


def test_errors_name_the_tensor():
    with pytest.raises(GGMergeError, match="multiple of its block size 256") as e:
        quantize(np.zeros((2, 576), np.float32), QType.Q4_K, tensor="blk.0.ffn_down.weight")
    assert "blk.0.ffn_down.weight" in str(e.value)
    bad = np.zeros((1, 256), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(GGMergeError, match="NaN") as e:
        quantize(bad, QType.Q6_K, tensor="blk.1.attn_q.weight")
    assert "blk.1.attn_q.weight" in str(e.value)
    big = np.zeros((64, 4096), np.float32)
    big[50, 7] = -np.inf  # in a later chunk, found by a worker thread
    for threads in (1, 2):
        with pytest.raises(GGMergeError, match="NaN or infinite values to Q4_0"):
            quantize(big, QType.Q4_0, threads=threads, tensor="t")
    with pytest.raises(GGMergeError, match="no quantizer for IQ2_XXS"):
        quantize(np.zeros((1, 256), np.float32), QType.IQ2_XXS)


@needs_libggml
def test_float_types_keep_nan_and_inf_like_ggml():
    x = np.array([[np.nan, -np.nan, np.inf, -np.inf, 65520.0, 65519.0, 1e-8, -6e-8]], np.float32)
    bits = np.array([[0x7FC00001, 0xFFA00000, 0x7F800001, 0x00000001]], np.uint32).view(np.float32)
    for qtype in FLOAT_TYPES:
        for v in (x, bits):
            _assert_same(quantize(v, qtype), libggml.ref_quantize(v, qtype), qtype.name)


# The float32 primitives the codecs are built on, each against what C does.

@needs_libggml
def test_fp16_conversion_matches_ggml_on_random_bit_patterns():
    """The fp16 store every block type uses for its scales, through F16 (its one other user)."""
    v = _rng(6).integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    _assert_same(quantize(v[None, :], QType.F16), libggml.ref_quantize(v[None, :], QType.F16), "F16")


@needs_libggml
def test_fp16_value_matches_ggml_on_every_half():
    """fp16_value (GGML_FP16_TO_FP32, read back for the final levels) on all 65536 patterns."""
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    ref = libggml.ref_dequantize(halves.view(np.uint8)[None, :], QType.F16)[0]
    ours = np.array([fp16_value(int(h)) for h in halves], dtype=np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_nearest_int_is_ggml_bit_trick():
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 4194303.0, 5e6, -5e6, 1e30, np.inf, np.nan], np.float32)
    got = np.array([nearest_int(f) for f in v])
    # round half to even inside |v| < 2**22 ...
    np.testing.assert_array_equal(got[:6], [0, 2, 2, 0, -2, 4194303])
    # ... and the C trick's own answers beyond (float add of 1.5*2**23, low 23 mantissa bits)
    with np.errstate(invalid="ignore"):
        t = (v[6:] + np.float32(12582912.0)).view(np.int32)
    np.testing.assert_array_equal(got[6:], (t & 0x7FFFFF) - 0x400000)


@pytest.mark.slow
def test_kernels_compile_to_plain_float32_ops(tmp_path, monkeypatch):
    """The premise of exactness: every kernel computes in float32 (no float64 value anywhere:
    numba promotes ``float32 * int`` and ``float32 * 0.5`` to float64) and LLVM fuses no multiply-add
    (no fastmath), as ggml-base's plain -O3 build does. Cached kernels cannot be inspected, so fresh
    copies of the kernel modules are compiled here without the cache."""
    import ggmerge.convert.quants as pkg
    from numba.core.registry import CPUDispatcher

    src = Path(pkg.__file__).parent
    dst = tmp_path / "quants_nocache"
    dst.mkdir()
    (dst / "__init__.py").write_text("")
    mods = ["ggml_float", "legacy", "kquants", "kquants_low", "weighted"]
    for m in mods:
        text = (src / f"{m}.py").read_text()
        if m == "ggml_float":
            assert 'JIT = {"cache": True,' in text
            text = text.replace('JIT = {"cache": True,', 'JIT = {"cache": False,')
        (dst / f"{m}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        copies = {m: importlib.import_module(f"quants_nocache.{m}") for m in mods}
        x = _rng(11).standard_normal(1024).astype(np.float32)
        for m in ("legacy", "kquants", "kquants_low"):
            for name in dir(copies[m]):
                if name.startswith("quantize_"):
                    getattr(copies[m], name)(x, np.zeros(2048, np.uint8))
        qw = _rng(12).random(256).astype(np.float32)
        for name in dir(copies["weighted"]):
            if name.startswith("quantize_"):
                getattr(copies["weighted"], name)(x, np.zeros(2048, np.uint8), qw)
                if name.startswith("quantize_iq4"):  # the NULL-weights path too
                    getattr(copies["weighted"], name)(x, np.zeros(2048, np.uint8), qw[:0])
        checked = 0
        for m, mod in copies.items():
            for name, fn in vars(mod).items():
                if not (isinstance(fn, CPUDispatcher) and fn.__module__ == mod.__name__):
                    continue
                for sig, cres in fn.overloads.items():
                    wide = {k: str(t) for k, t in cres.type_annotation.typemap.items()
                            if "float64" in str(t) or "complex" in str(t)}
                    assert not wide, f"{m}.{name}{sig}: float64 values {wide}"
                    asm = fn.inspect_asm(sig)
                    body = asm[:asm.find("_ZN7cpython")]  # the nopython function, not its wrapper
                    assert not re.search(r"vf[n]?m(add|sub)", asm), f"{m}.{name}: FMA"
                    assert not re.search(r"cvtss2sd|cvtsd2ss", body), f"{m}.{name}: float64"
                    checked += 1
        assert checked >= 45
    finally:
        for m in [k for k in sys.modules if k.startswith("quants_nocache")]:
            del sys.modules[m]
        shutil.rmtree(dst, ignore_errors=True)

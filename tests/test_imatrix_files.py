"""ggmerge.imatrix.files: llama.cpp's imatrix formats read, written, and turned into quantizer weights.

The real-tool checks (llama-imatrix's own files read back; our files accepted by llama-quantize with
the same output bytes) live in tests/test_imatrix_quantize.py; here: the format rules against
libggml's GGUF reader, the weights formula, and bad files.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from ggmerge.errors import GGMergeError
from ggmerge.imatrix.files import load_imatrix, write_imatrix


def _entries(rng):
    return {
        "blk.1.attn_q.weight": (rng.random(64).astype(np.float32) * 10, 300),
        "blk.0.ffn_down_exps.weight": (rng.random((4, 32)).astype(np.float32), np.array([10, 0, 5, 7])),
        "output.weight": (np.zeros(64, np.float32), 0),
    }


def test_roundtrip_and_weights(tmp_path):
    rng = np.random.default_rng(0)
    e = _entries(rng)
    p = write_imatrix(tmp_path / "im.gguf", e, datasets=["a.txt", "b.txt"], chunk_count=3, chunk_size=512)
    im = load_imatrix(p)
    assert not im.is_legacy and im.datasets == ["a.txt", "b.txt"]
    assert (im.chunk_count, im.chunk_size) == (3, 512)
    # quantize.cpp load_imatrix: float32 sum / float(count) per expert, 1 where count is 0
    np.testing.assert_array_equal(im.weights["blk.1.attn_q.weight"], e["blk.1.attn_q.weight"][0] / np.float32(300))
    w = im.weights["blk.0.ffn_down_exps.weight"].reshape(4, 32)
    s = e["blk.0.ffn_down_exps.weight"][0]
    np.testing.assert_array_equal(w[0], s[0] / np.float32(10))
    np.testing.assert_array_equal(w[1], np.ones(32, np.float32))
    np.testing.assert_array_equal(w[3], s[3] / np.float32(7))
    np.testing.assert_array_equal(im.weights["output.weight"], np.ones(64, np.float32))
    assert im.for_tensor("blk.0.ffn_down_exps.weight", 32, 4).shape == (4, 32)
    assert im.for_tensor("missing.weight", 32) is None
    with pytest.raises(GGMergeError, match="another model"):
        im.for_tensor("blk.1.attn_q.weight", 128)
    assert im.quantize_kvs("dir/im.gguf") == [
        ("quantize.imatrix.file", "dir/im.gguf", "str"), ("quantize.imatrix.dataset", "a.txt", "str"),
        ("quantize.imatrix.entries_count", 3, "u32"), ("quantize.imatrix.chunks_count", 3, "u32")]


def test_libggml_reads_our_file(tmp_path):
    """libggml's own gguf_init_from_file accepts the file and sees the tensors in save_imatrix's order."""
    pytest.importorskip("llama_cpp")
    from ggmerge import libggml

    p = write_imatrix(tmp_path / "im.gguf", _entries(np.random.default_rng(1)), datasets=[], chunk_count=0,
                      chunk_size=512)
    names = libggml.gguf_tensor_names(p)
    assert names == [f"{n}.{s}" for n in sorted(_entries(np.random.default_rng(1))) for s in ("in_sum2", "counts")]


def _legacy(entries, trailer=(7, b"text.txt")) -> bytes:
    """The layout save_imatrix_legacy writes (tools/imatrix/imatrix.cpp)."""
    items = entries.items() if isinstance(entries, dict) else entries
    out = struct.pack("<i", len(items))
    for name, (ncall, vals) in items:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(vals))
        out += np.asarray(vals, "<f4").tobytes()
    if trailer is not None:
        out += struct.pack("<ii", trailer[0], len(trailer[1])) + trailer[1]
    return out


def test_legacy(tmp_path):
    v = np.arange(1, 9, dtype=np.float32) * 3
    p = tmp_path / "im.dat"
    p.write_bytes(_legacy({"blk.0.attn_k.weight": (3, v), "blk.0.attn_v.weight": (0, v)}))
    im = load_imatrix(p)
    assert im.is_legacy and im.chunk_count == 7 and im.datasets == ["text.txt"]
    np.testing.assert_array_equal(im.weights["blk.0.attn_k.weight"], v / np.float32(3))
    np.testing.assert_array_equal(im.weights["blk.0.attn_v.weight"], v)  # ncall <= 0: the values as stored
    p.write_bytes(_legacy({"a.weight": (3, v)}, trailer=None))  # the trailer is optional
    assert load_imatrix(p).chunk_count == 0


@pytest.mark.parametrize("case, message", [
    ("empty", "not an imatrix file"),
    ("huge_count", "not an imatrix file"),
    ("huge_name", "claims a name of"),
    ("truncated_values", "truncated legacy imatrix"),
    ("huge_nval", "claims 2147483647 values"),
    ("duplicate", "appears twice"),
    ("nonfinite", "non-finite"),
    ("model_gguf", "not an imatrix file: no imatrix.datasets"),
    ("unpaired", "has no matching"),
    ("truncated_gguf", "truncated"),
    ("missing", "no such imatrix file"),
])
def test_bad_files(tmp_path, case, message):
    p = tmp_path / "bad"
    v = np.ones(8, np.float32)
    if case == "empty":
        p.write_bytes(b"")
    elif case == "huge_count":
        p.write_bytes(struct.pack("<i", 1 << 30))
    elif case == "huge_name":
        p.write_bytes(struct.pack("<ii", 1, 1 << 30))
    elif case == "truncated_values":
        p.write_bytes(_legacy({"a.weight": (1, v)})[:30])
    elif case == "huge_nval":
        p.write_bytes(struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 2**31 - 1))
    elif case == "duplicate":
        p.write_bytes(_legacy([("a.weight", (1, v)), ("a.weight", (1, v))]))
    elif case == "nonfinite":
        p.write_bytes(_legacy({"a.weight": (1, np.full(8, np.inf, np.float32))}))
    elif case == "model_gguf":
        import gguf
        w = gguf.GGUFWriter(p, "llama")
        w.add_tensor("x.weight", np.ones(4, np.float32))
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    elif case == "unpaired":
        write_imatrix(p, {"a.weight": (v, 1)}, datasets=[], chunk_count=1, chunk_size=8)
        import gguf
        r = gguf.GGUFReader(p)
        p2 = tmp_path / "b"  # the same entry without its counts tensor
        w = gguf.GGUFWriter(p2, arch="x")
        w.add_array("imatrix.datasets", ["t"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 8)
        w.add_tensor("a.weight.in_sum2", np.array(r.tensors[0].data))
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        p = p2
    elif case == "truncated_gguf":
        write_imatrix(p, {"a.weight": (v, 1)}, datasets=[], chunk_count=1, chunk_size=8)
        p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(GGMergeError, match=message) as err:
        load_imatrix(p)
    assert str(p) in str(err.value)


def test_write_refuses_and_leaves_nothing(tmp_path):
    p = tmp_path / "im.gguf"
    with pytest.raises(GGMergeError, match="do not split"):
        write_imatrix(p, {"a.weight": (np.ones(10, np.float32), [1, 2, 3])}, datasets=[], chunk_count=1,
                      chunk_size=8)
    assert not p.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_fuzzed_files_give_one_clear_error_or_a_valid_imatrix(tmp_path, fmt):
    """Truncations and byte flips anywhere: a GGMergeError or a readable file, never another exception
    (and no allocation the file cannot back: lengths are checked before reading)."""
    rng = np.random.default_rng(3)
    good = tmp_path / "good"
    if fmt == "gguf":
        write_imatrix(good, _entries(rng), datasets=["t.txt"], chunk_count=2, chunk_size=64)
    else:
        good.write_bytes(_legacy({"a.weight": (3, np.ones(40, np.float32)), "b.weight": (1, np.ones(8, np.float32))}))
    data = good.read_bytes()
    p = tmp_path / "fuzzed"
    for i in range(300):
        b = bytearray(data)
        if i % 3 == 0:
            b = b[:int(rng.integers(0, len(b)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                at = int(rng.integers(0, len(b)))
                b[at] = int(rng.integers(0, 256))
        p.write_bytes(bytes(b))
        try:
            im = load_imatrix(p)
        except GGMergeError as exc:
            assert "\n" not in str(exc)
            continue
        for w in im.weights.values():
            assert w.dtype == np.float32 and np.isfinite(w).all()

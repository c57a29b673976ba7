"""libggml as a reference, through ctypes.

llama-cpp-python bundles ``libggml-base`` (the library holding ggml's quantizers, ``ggml_quantize_chunk``,
and the type traits). The tests and the quantizer benchmarks call it directly so that our codecs are
compared with the bytes llama.cpp itself writes, not with our own reading of its source; ggmerge itself
never needs it.

    from ggmerge import libggml
    raw = libggml.ref_quantize(x, GGMLQuantizationType.Q4_K)  # ggml_quantize_chunk(imatrix=NULL)
    back = libggml.ref_dequantize(raw, GGMLQuantizationType.Q4_K)  # the type's to_float

Importing it without llama-cpp-python installed raises ImportError.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

import llama_cpp  # noqa: F401  (ImportError here means the reference is genuinely unavailable)

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml/include/ggml.h
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


class _GGUFInitParams(ctypes.Structure):
    # struct gguf_init_params in ggml/include/gguf.h
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def gguf_tensor_names(path) -> list[str] | None:
    """Tensor names as libggml's own ``gguf_init_from_file`` reads them, or None if it refuses the file."""
    lib = _lib()
    ctx = lib.gguf_init_from_file(os.fsencode(path), _GGUFInitParams(True, None))
    if not ctx:
        return None
    try:
        return [lib.gguf_get_tensor_name(ctx, i).decode() for i in range(lib.gguf_get_n_tensors(ctx))]
    finally:
        lib.gguf_free(ctx)


def lib_dir() -> str:
    return os.path.join(os.path.dirname(llama_cpp.__file__), "lib")


@functools.cache
def _lib() -> ctypes.CDLL:
    candidates = sorted(glob.glob(os.path.join(lib_dir(), "libggml-base.so*")))
    candidates += sorted(glob.glob(os.path.join(lib_dir(), "libggml-base*.dylib")))
    candidates += sorted(glob.glob(os.path.join(lib_dir(), "ggml-base.dll")))
    if not candidates:
        raise ImportError(f"no libggml-base in {lib_dir()}")
    lib = ctypes.CDLL(candidates[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def type_traits(qtype: GGMLQuantizationType) -> _TypeTraits:
    return _lib().ggml_get_type_traits(int(qtype)).contents


def ref_quantize(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Bytes of ``ggml_quantize_chunk(qtype, data, start=0, nrows, n_per_row, imatrix)``.

    ``data`` is float32 of shape (..., n_per_row); the result is uint8 of shape
    (..., n_per_row // block_size * type_size), the layout GGUF stores. Single-threaded.
    ``imatrix`` (float32, n_per_row) is the importance weights llama-quantize passes; None = NULL.
    """
    x = np.ascontiguousarray(data, dtype=np.float32)
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert qw.shape == (x.shape[-1],), qw.shape
    n_per_row = x.shape[-1]
    nrows = x.size // n_per_row if n_per_row else 0
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block_size:
        raise ValueError(f"{n_per_row} is not a multiple of the {qtype.name} block size {block_size}")
    row_bytes = n_per_row // block_size * type_size
    lib = _lib()
    assert lib.ggml_row_size(int(qtype), n_per_row) == row_bytes
    out = np.zeros(x.shape[:-1] + (row_bytes,), dtype=np.uint8)
    if nrows:
        # ggml_quantize_chunk calls ggml_quantize_init itself (a no-op for the types without an imatrix)
        written = lib.ggml_quantize_chunk(
            int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row,
            None if qw is None else qw.ctypes.data)
        assert written == nrows * row_bytes, (written, nrows * row_bytes)
    return out


def ref_dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values of ggml's ``to_float`` for ``qtype`` (shape (..., n_per_row))."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    r = np.ascontiguousarray(raw, dtype=np.uint8)
    n_per_row = r.shape[-1] // type_size * block_size
    out = np.empty(r.shape[:-1] + (n_per_row,), dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        out[...] = r.view(np.float32).reshape(out.shape)
        return out
    fn = type_traits(qtype).to_float
    if not fn:
        raise NotImplementedError(f"libggml has no to_float for {qtype.name}")
    if out.size:
        _to_float_t(fn)(r.ctypes.data, out.ctypes.data, out.size)
    return out

"""Reading GGUF files (torch-free): the reader, metadata values, which types gguf-py decodes, and one
tensor's bytes.

Every GGUF reader in ggmerge (the GGUF source, ``quantize``, ``inspect``, ``verify``, the architecture
families) opens files through :func:`open_reader`, so every one gets the same header bounds and the same
one-line error. Tensor bytes are read with positional reads, not through gguf-py's memory map: pages of a mapped file, once touched, count in the resident set until the mapping goes away, so a
whole-model pass through ``GGUFReader``'s map makes peak RSS grow to the file's size. Read into a fresh
buffer, the bytes live in the page cache (not RSS) and in memory only as long as the tensor does.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np

from ..errors import GGMergeError
from ..limits import check_gguf_header
from .readat import read_at

QType = gguf.GGMLQuantizationType


def open_reader(path: Path) -> gguf.GGUFReader:
    """``GGUFReader`` with its failures (bad magic, truncation, unknown types) as one GGMergeError."""
    check_gguf_header(path)  # bound every count and length before gguf-py believes them
    try:
        return gguf.GGUFReader(path, "r")
    except FileNotFoundError:
        raise GGMergeError("no such file", path=path) from None
    except (ValueError, OSError, IndexError, KeyError, TypeError) as exc:
        raise GGMergeError(f"not a readable GGUF file ({type(exc).__name__}: {exc})", path=path) from None


def field(reader: gguf.GGUFReader, key: str, default=None):
    """A metadata value as a Python value (str, int, float, bool or list), or ``default``."""
    f = reader.get_field(key)
    if f is None or not f.types:
        return default
    return f.contents()


@lru_cache(maxsize=None)
def dequantizable(qtype: QType) -> bool:
    """Whether gguf-py can dequantize ``qtype`` (tried on one zero block: gguf-py has no public table)."""
    if qtype in (QType.F32, QType.F16, QType.BF16):
        return True
    try:
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except Exception:  # noqa: BLE001 - NotImplementedError, or a codec that cannot run here
        return False
    return True


def read_tensor_data(f: BinaryIO, t, path: Path) -> np.ndarray:
    """A copy of ``t.data`` (a gguf-py ``ReaderTensor``: same dtype, byte order and shape) read from
    the open unbuffered file ``f``."""
    out = np.empty(t.data.shape, dtype=t.data.dtype)  # metadata of the view only: no page touched
    if out.nbytes != int(t.n_bytes):
        raise GGMergeError(f"tensor data is {out.nbytes} bytes, expected {int(t.n_bytes)}", path=path,
                           tensor=t.name)
    buf = memoryview(out.reshape(-1).view(np.uint8))
    try:
        read_at(f.fileno(), buf, int(t.data_offset))
    except OSError as exc:
        if not exc.strerror:  # our own "the file ends" error
            raise GGMergeError("the file ends inside this tensor's data (truncated?)", path=path,
                               tensor=t.name) from None
        raise GGMergeError(f"cannot read tensor: {exc.strerror or exc}", path=path, tensor=t.name) from None
    return out

"""Reading one GGUF tensor's bytes with ``readinto``, not through gguf-py's memory map (torch-free).

Pages of a mapped file, once touched, count in the resident set until the mapping goes away, so a
whole-model pass through ``GGUFReader``'s map makes peak RSS grow to the file's size. Read into a fresh
buffer, the bytes live in the page cache (not RSS) and in memory only as long as the tensor does.
Used by the GGUF source and by ``ggmerge quantize``.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import GGMergeError
from .readat import read_at


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

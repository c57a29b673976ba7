"""The one streaming GGUF writer: metadata, then tensors encoded and written one at a time.

gguf-py's ``GGUFWriter`` normally keeps every tensor in memory until ``write_tensors_to_file``. We
use its lower-level sequence instead — ``add_tensor_info`` for every tensor (shapes and byte sizes
are known before any data exists), then header → KV → tensor-info → ``write_tensor_data`` per
tensor — so at most one tensor (float32 + its encoding) is alive at any time, whatever the model size.

The file is written beside its destination and renamed into place only when complete
(:func:`ggmerge.atomic.atomic_path`); any failure leaves no partial file behind.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from ggmerge.atomic import atomic_path
from ggmerge.convert.quants import quantize
from ggmerge.errors import GGMergeError
from ggmerge.progress import track

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType


@dataclass
class OutTensor:
    #: GGUF tensor name, e.g. "blk.0.attn_q.weight"
    name: str
    #: numpy order (rows, cols) as stored
    shape: tuple[int, ...]
    #: the type to write
    qtype: gguf.GGMLQuantizationType
    #: float32 array in GGUF layout (already permuted); called once, lazily
    load: Callable[[], np.ndarray]
    #: optional: already-encoded bytes to copy verbatim (e.g. an unchanged quantized input tensor)
    raw: Callable[[], np.ndarray] | None = None


def encoded_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes ``shape`` occupies as ``qtype``; the row length must be a whole number of blocks."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if not shape:
        raise ValueError("a tensor needs at least one dimension")
    row = int(shape[-1])
    if row % block:
        raise ValueError(f"row length {row} is not a multiple of the {qtype.name} block size {block}")
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return n_rows * (row // block) * type_size


def write_gguf(
    path: str | os.PathLike,
    arch: str,
    metadata: Callable[[gguf.GGUFWriter], None],
    tensors: list[OutTensor],
    *,
    description: str = "",
) -> None:
    """Write a GGUF file at ``path``: ``metadata(writer)`` adds the KVs, then ``tensors`` in order.

    Every tensor's size is checked before the file is created, so a shape/type mismatch is reported
    (naming the file and tensor) before any bytes are written. Each tensor is loaded, encoded with
    ``ggmerge.convert.quants.quantize`` (or copied from ``raw``), written and released before the
    next one is touched.
    """
    seen: set[str] = set()
    sizes: list[int] = []
    for t in tensors:
        if t.name in seen:
            raise GGMergeError("tensor name appears twice in the output plan", path=path, tensor=t.name)
        seen.add(t.name)
        try:
            sizes.append(encoded_nbytes(tuple(t.shape), t.qtype))
        except ValueError as exc:
            raise GGMergeError(f"cannot store as {t.qtype.name}: {exc}", path=path, tensor=t.name) from None

    total = sum(sizes)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            metadata(writer)
            for t, nbytes in zip(tensors, sizes):
                # the dtype argument only matters for raw_dtype=None; uint8 would reinterpret the shape
                writer.add_tensor_info(t.name, tuple(t.shape), np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with track(description or f"writing {os.fspath(path)}", total, len(tensors)) as bar:
                for t, nbytes in zip(tensors, sizes):
                    data = _encode(t, path)
                    if data.nbytes != nbytes:
                        raise GGMergeError(
                            f"encoded {t.qtype.name} data has {data.nbytes} bytes, expected {nbytes} "
                            f"for shape {tuple(t.shape)}", path=path, tensor=t.name)
                    # ndarray.tofile (inside write_tensor_data) loses errno: ENOSPC and EFBIG would
                    # reach the user as "N requested and M written"; file.write keeps them
                    fout = writer.fout[0]
                    writer.write_padding(fout, fout.tell())
                    fout.write(data.reshape(-1).view(np.uint8).data)
                    writer.write_padding(fout, data.nbytes)
                    del data
                    bar.advance(nbytes, name=t.name)
        finally:
            writer.close()
    log.info("wrote %s (%d tensors, %.1f MiB)", path, len(tensors), total / 2**20)


def _encode(t: OutTensor, path) -> np.ndarray:
    """One tensor's bytes, ready for the file."""
    try:
        if t.raw is not None:
            return np.ascontiguousarray(t.raw())
        # np.asarray also accepts a CPU torch tensor (a loader that forgot .numpy())
        arr = np.ascontiguousarray(np.asarray(t.load()), dtype=np.float32)
        if arr.shape != tuple(t.shape):
            raise GGMergeError(f"loaded shape {arr.shape} differs from the planned {tuple(t.shape)}",
                               path=path, tensor=t.name)
        # two reductions rather than np.isfinite(arr).all(), which allocates a bool per element:
        # NaN propagates through min/max and ±inf shows as itself, so this is the same test
        if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
            raise GGMergeError("holds NaN or infinite values; refusing to write them", path=path, tensor=t.name)
        return np.ascontiguousarray(quantize(arr, t.qtype, tensor=t.name))
    except GGMergeError as exc:
        if exc.tensor is None:
            exc.tensor = t.name
        if exc.path is None:
            exc.path = Path(path)
        raise
    except (ValueError, TypeError, NotImplementedError, ArithmeticError) as exc:
        raise GGMergeError(f"cannot encode as {t.qtype.name}: {exc}", path=path, tensor=t.name) from exc

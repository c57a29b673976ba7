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

QType = gguf.GGMLQuantizationType


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
    #: optional importance weights for the quantizer: (n_cols,) or (n_experts, n_cols) float32
    imatrix: np.ndarray | None = None


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
    with GGUFFile(path, arch, metadata, tensors) as out:
        with track(description or f"writing {os.fspath(path)}", out.total, len(tensors)) as bar:
            for t in tensors:
                out.put(t.name, _encode(t, path))
                bar.advance(out.nbytes[t.name], name=t.name)
        out.finish()


class GGUFFile:
    """A GGUF file whose tensors may arrive in any order, each written at its place as soon as it exists.

    The header, the KV pairs and every tensor's info come first and fix every data offset (from the
    shapes and types alone), so the file is sized once — its padding is the zero bytes of a sparse
    extension, as gguf-py writes them — and each tensor's encoded bytes go to their offset with a
    positional write: whole (:meth:`put`) or a block of rows at a time (:meth:`put_rows`). Written under a
    temporary name and renamed on :meth:`finish`; leaving the ``with`` block any other way removes it.
    """

    def __init__(self, path: str | os.PathLike, arch: str, metadata: Callable[[gguf.GGUFWriter], None],
                 tensors: list[OutTensor]) -> None:
        self.path = Path(path)
        self.nbytes: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for t in tensors:
            if t.name in self.nbytes:
                raise GGMergeError("tensor name appears twice in the output plan", path=path, tensor=t.name)
            try:
                self.nbytes[t.name] = encoded_nbytes(tuple(t.shape), t.qtype)
            except ValueError as exc:
                raise GGMergeError(f"cannot store as {t.qtype.name}: {exc}", path=path, tensor=t.name) from None
            self.shapes[t.name] = tuple(t.shape)
        self.total = sum(self.nbytes.values())
        self._done: set[str] = set()
        self._atomic = atomic_path(self.path)
        self.tmp = self._atomic.__enter__()
        self._open = True
        try:
            writer = gguf.GGUFWriter(self.tmp, arch)
            try:
                metadata(writer)
                for t in tensors:
                    # the dtype argument only matters for raw_dtype=None; uint8 would reinterpret the shape
                    writer.add_tensor_info(t.name, tuple(t.shape), np.dtype(np.float32), self.nbytes[t.name],
                                           raw_dtype=t.qtype)
                writer.write_header_to_file(path=self.tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                fout = writer.fout[0]
                fout.flush()
                align = writer.data_alignment
                pad = lambda n: -(-n // align) * align  # noqa: E731 - ggml_pad
                at = pad(fout.tell())
                self.offsets: dict[str, int] = {}
                for t in tensors:
                    self.offsets[t.name] = at
                    at += pad(self.nbytes[t.name])
                os.truncate(self.tmp, at)
            finally:
                writer.close()
            self._fd = os.open(self.tmp, os.O_WRONLY)
        except BaseException as exc:
            self._fail(exc)

    def put(self, name: str, data: np.ndarray) -> None:
        """The whole encoded tensor ``name``."""
        data = np.ascontiguousarray(data)
        if data.nbytes != self.nbytes[name]:
            self._fail(GGMergeError(f"encoded data has {data.nbytes} bytes, expected {self.nbytes[name]} "
                                    f"for shape {self.shapes[name]}", path=self.path, tensor=name))
        self._pwrite(name, 0, data)
        self._done.add(name)

    def put_rows(self, name: str, r0: int, data: np.ndarray, last: bool) -> None:
        """Encoded rows ``r0…`` of ``name`` (a tensor of rows quantized independently); ``last`` marks
        its final block."""
        rows = self.shapes[name][0] if len(self.shapes[name]) > 1 else 1
        self._pwrite(name, r0 * (self.nbytes[name] // rows), np.ascontiguousarray(data))
        if last:
            self._done.add(name)

    def _pwrite(self, name: str, offset: int, data: np.ndarray) -> None:
        buf = memoryview(data.reshape(-1).view(np.uint8))
        at = self.offsets[name] + offset
        try:
            done = 0
            while done < len(buf):
                done += os.pwrite(self._fd, buf[done:], at + done)
        except OSError as exc:
            from ggmerge.atomic import _explain

            self._fail(_explain(exc, self.path))

    def finish(self) -> Path:
        missing = [n for n in self.offsets if n not in self._done]
        if missing:
            self._fail(GGMergeError(f"{len(missing)} tensor(s) never written", path=self.path, tensor=missing[0]))
        os.close(self._fd)
        self._open = False
        self._atomic.__exit__(None, None, None)
        log.info("wrote %s (%d tensors, %.1f MiB)", self.path, len(self.offsets), self.total / 2**20)
        return self.path

    def abort(self) -> None:
        if self._open:
            self._open = False
            if hasattr(self, "_fd"):
                os.close(self._fd)
            self._atomic.__exit__(GGMergeError, GGMergeError("aborted", path=self.path), None)

    def _fail(self, exc: BaseException):
        self.abort()
        raise exc

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


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
        return np.ascontiguousarray(quantize(arr, t.qtype, tensor=t.name, imatrix=t.imatrix))
    except GGMergeError as exc:
        if exc.tensor is None:
            exc.tensor = t.name
        if exc.path is None:
            exc.path = Path(path)
        raise
    except (ValueError, TypeError, NotImplementedError, ArithmeticError) as exc:
        raise GGMergeError(f"cannot encode as {t.qtype.name}: {exc}", path=path, tensor=t.name) from exc

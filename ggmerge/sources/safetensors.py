"""HF model folders (one or many ``.safetensors`` shards) and single ``.safetensors`` files as sources.

Each shard is checked by ``safetensors.safe_open`` (its header validation and its errors), but tensor
bytes are read with plain ``readinto`` calls at the header's offsets into a fresh buffer, not through
safe_open's memory map: pages of a mapped file that have been touched count in the process's resident
set until the mapping goes away, so reading a whole model through the map makes peak RSS grow to the
size of every input, although each tensor is dropped after use. Read into a buffer, a tensor's bytes
live in the page cache (reclaimable, not RSS) and in memory only while the tensor does.
Every shard header is read at open time so that a broken checkpoint (a truncated file, an index naming
a missing shard or tensor, a tensor stored twice) is reported before any merge work starts, naming the
file and the tensor.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..arch import is_ignored
from ..errors import GGMergeError, did_you_mean
from .readat import read_at

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

#: safetensors dtype -> torch dtype, for the types read straight into a torch buffer (every type torch
#: has); the rest (sub-byte floats) go through safe_open's own reader
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                 "U8": torch.uint8, "BOOL": torch.bool}
for _st, _pt in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
                 ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _pt):
        _TORCH_DTYPES[_st] = getattr(torch, _pt)


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file size."""
    return _read_header_at(path)[0]


def _read_header_at(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file, checked against the file size, and the file offset
    where its data section starts (tensor ``data_offsets`` count from there).

    Every entry is checked against the file by :func:`ggmerge.limits.check_safetensors_header` (known
    dtype, shape × dtype size = byte span, spans inside the file, no overlaps), which names the file
    and tensor — safetensors' own errors name neither.
    """
    from ..limits import check_safetensors_header

    header = check_safetensors_header(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # already validated above
    return header, 8 + n


class SafetensorsSource:
    """A source over an HF folder (single or sharded safetensors) or one ``.safetensors`` file.

    ``path`` is a folder holding ``config.json`` and ``*.safetensors`` (with
    ``model.safetensors.index.json`` when sharded), or a single ``.safetensors`` file whose config
    and tokenizer are taken from its folder.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._headers: dict[Path, dict] = {}
        self._data_start: dict[Path, int] = {}
        if self.path.is_file():
            self.folder = self.path.parent
            shard_of = {n: self.path for n in self._tensor_names(self.path)}
        elif self.path.is_dir():
            self.folder = self.path
            shard_of = self._scan_folder()
        else:
            raise GGMergeError("no such file or folder", path=self.path)
        # shard -> open safe_open handle (validation, and the reader of exotic dtypes) and unbuffered
        # file object (the reader of tensor bytes); both opened lazily, kept until close()
        self._handles: dict[Path, object] = {}
        self._files: dict[Path, object] = {}
        self._lock = threading.Lock()
        self._shard_of: dict[str, Path] = {}
        for name, shard in shard_of.items():
            if is_ignored(name):
                log.debug("%s: ignoring %s (recomputed by the model)", shard, name)
                continue
            self._shard_of[name] = shard
        if not self._shard_of:
            raise GGMergeError("holds no tensors", path=self.path)
        self._config: dict | None = None

    # -- opening ---------------------------------------------------------------------------------
    def _tensor_names(self, shard: Path) -> list[str]:
        header, self._data_start[shard] = _read_header_at(shard)
        self._headers[shard] = header
        return [k for k in header if k != "__metadata__"]

    def _scan_folder(self) -> dict[str, Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            return self._from_index(index)
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise GGMergeError("no *.safetensors files in this folder", path=self.folder)
        shard_of: dict[str, Path] = {}
        for shard in shards:
            for name in self._tensor_names(shard):
                if name in shard_of:
                    raise GGMergeError(
                        f"tensor is stored twice: in {shard_of[name].name} and in {shard.name}",
                        path=shard, tensor=name)
                shard_of[name] = shard
        return shard_of

    def _from_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise GGMergeError("not a valid safetensors index (no 'weight_map' object)", path=index) from None
        names_in: dict[Path, set[str]] = {}
        for fname in sorted(set(weight_map.values())):
            shard = self.folder / fname
            if not shard.is_file():
                first = next(t for t, f in weight_map.items() if f == fname)
                raise GGMergeError(f"the index names shard '{fname}', which does not exist",
                                   path=index, tensor=first)
            names_in[shard] = set(self._tensor_names(shard))
        # A tensor present in two shards is ambiguous whatever the index says: refuse it.
        seen: dict[str, Path] = {}
        for shard, names in names_in.items():
            for name in sorted(names):
                if name in seen:
                    raise GGMergeError(
                        f"tensor is stored twice: in {seen[name].name} and in {shard.name}",
                        path=shard, tensor=name)
                seen[name] = shard
        shard_of: dict[str, Path] = {}
        for name, fname in weight_map.items():
            shard = self.folder / fname
            if name not in names_in[shard]:
                raise GGMergeError(f"the index places this tensor in '{fname}', which does not contain it",
                                   path=index, tensor=name)
            shard_of[name] = shard
        extra = sorted(set(seen) - set(shard_of))
        if extra:
            log.warning("%s: %d tensor(s) in the shards are not in the index and are ignored (e.g. %s)",
                        index, len(extra), extra[0])
        # file order: shard by shard, each in its header's (offset) order
        order = {n: i for i, n in enumerate(seen)}
        return dict(sorted(shard_of.items(), key=lambda kv: order[kv[0]]))

    def _handle(self, shard: Path):
        h = self._handles.get(shard)
        if h is None:
            with self._lock:
                h = self._handles.get(shard)
                if h is not None:
                    return h
                try:
                    h = safe_open(str(shard), framework="pt", device="cpu")
                except (SafetensorError, OSError, ValueError) as exc:
                    raise GGMergeError(f"cannot open as safetensors: {exc}", path=shard) from None
                self._handles[shard] = h
        return h

    # -- TensorSource ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._shard_of)

    def _info(self, name: str) -> dict:
        try:
            shard = self._shard_of[name]
        except KeyError:
            raise GGMergeError(f"no such tensor{did_you_mean(name, self._shard_of)}",
                               path=self.path, tensor=name) from None
        return self._headers[shard][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._info(name)["shape"])

    def dtype(self, name: str) -> str:
        return str(self._info(name)["dtype"]).upper()

    def shard(self, name: str) -> Path:
        """The file holding ``name`` (for messages and hashing)."""
        self._info(name)
        return self._shard_of[name]

    def load(self, name: str) -> torch.Tensor:
        info = self._info(name)
        shape = [int(d) for d in info["shape"]]
        raw = self.read_rows(name, 0, shape[0] if shape else 1)
        # the buffer is ours alone, so an F32 tensor needs no defensive copy
        return raw if raw.dtype == torch.float32 else raw.to(torch.float32)

    def read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[r0, r1)`` of ``name`` (dim 0; a 0-D or 1-D tensor is one row of everything) in the
        dtype the file stores them, read (not mapped) into a new tensor, or into ``out`` (contiguous, of
        that dtype and size). Thread-safe."""
        info = self._info(name)
        shard = self._shard_of[name]
        self._handle(shard)  # safe_open validates the whole header once per shard (and names the file)
        dtype = _TORCH_DTYPES.get(str(info["dtype"]).upper())
        if dtype is None or sys.byteorder != "little":
            return self._load_mapped(shard, name)[r0:r1]
        try:
            return self._read(shard, info, dtype, r0, r1, out)
        except OSError as exc:
            raise GGMergeError(f"cannot read tensor: {exc.strerror or exc}", path=shard, tensor=name) from None
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise GGMergeError(f"cannot read tensor: {exc}", path=shard, tensor=name) from None

    def _read(self, shard: Path, info: dict, dtype: torch.dtype, r0: int, r1: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the tensor's bytes read from ``shard`` into a tensor of ``dtype``."""
        begin, end = (int(x) for x in info["data_offsets"])
        shape = [int(d) for d in info["shape"]]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes != end - begin:  # safe_open refuses such a header already; never read a wrong span
            raise ValueError(f"{info['dtype']} {info['shape']} needs {nbytes} bytes, data_offsets span {end - begin}")
        if len(shape) >= 1 and (r0, r1) != (0, shape[0]):
            row = nbytes // shape[0] if shape[0] else 0
            shape = [r1 - r0, *shape[1:]]
            begin, nbytes = begin + r0 * row, (r1 - r0) * row
        if out is None:
            t = torch.empty(shape, dtype=dtype)
        else:
            if out.dtype != dtype or out.numel() != math.prod(shape) or not out.is_contiguous():
                raise ValueError(f"read_rows: out must be contiguous {dtype} with {math.prod(shape)} elements")
            t = out.view(shape)
        if nbytes == 0:
            return t
        read_at(self._fd(shard), memoryview(t.reshape(-1).view(torch.uint8).numpy()), self._data_start[shard] + begin)
        return t

    def _fd(self, shard: Path) -> int:
        f = self._files.get(shard)
        if f is None:
            with self._lock:
                f = self._files.get(shard)
                if f is None:
                    f = self._files[shard] = open(shard, "rb", buffering=0)
        return f.fileno()

    def _load_mapped(self, shard: Path, name: str) -> torch.Tensor:
        """safe_open's own reader, through its memory map: for dtypes torch has no buffer type for."""
        try:
            t = self._handle(shard).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise GGMergeError(f"cannot read tensor: {exc}", path=shard, tensor=name) from None
        if t.dtype == torch.float32:
            # safetensors hands out F32 tensors as views of its (copy-on-write) memory map, shared by
            # every later get_tensor of the same name: copy, so in-place math cannot leak between loads
            return t.contiguous().clone()
        return t.to(torch.float32).contiguous()

    def config(self) -> dict:
        if self._config is None:
            cfg = self.folder / CONFIG_NAME
            if not cfg.is_file():
                raise GGMergeError("no config.json beside the safetensors file(s)", path=self.folder)
            try:
                self._config = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise GGMergeError(f"cannot read config.json: {exc}", path=cfg) from None
        return dict(self._config)

    def tokenizer_dir(self) -> Path | None:
        if any((self.folder / f).is_file() for f in TOKENIZER_FILES):
            return self.folder
        return None

    def metadata(self, shard: Path | None = None) -> dict[str, str]:
        """The ``__metadata__`` of a shard (the first one by default)."""
        shard = shard or next(iter(self._shard_of.values()))
        return dict(self._headers[shard].get("__metadata__") or {})

    def close(self) -> None:
        self._handles.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsSource({str(self.path)!r}, {len(self._shard_of)} tensors)"

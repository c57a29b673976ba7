"""HF model folders (one or many ``.safetensors`` shards) and single ``.safetensors`` files as sources.

Tensors are read lazily through ``safetensors.safe_open``, which memory-maps each shard: loading one
tensor touches only that tensor's bytes. Every shard header is read at open time so that a broken
checkpoint (a truncated file, an index naming a missing shard or tensor, a tensor stored twice) is
reported before any merge work starts, naming the file and the tensor.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..arch import llama
from ..errors import GGMergeError, did_you_mean

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
#: safetensors refuses headers above 100 MB; so do we, before reading one into memory
MAX_HEADER = 100_000_000


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file size.

    safetensors' own error for a truncated file does not say which file; a model folder has many,
    so we check the layout here (8-byte little-endian length, JSON, then data) and name the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise GGMergeError("not a safetensors file (shorter than its 8-byte header length)", path=path)
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size or n > MAX_HEADER:
                raise GGMergeError(
                    f"not a valid safetensors file (header length {n} does not fit in {size} bytes; "
                    "truncated or not safetensors)", path=path)
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise GGMergeError(f"not a valid safetensors file (header is not JSON: {exc})", path=path) from None
    except OSError as exc:
        raise GGMergeError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if not isinstance(header, dict):
        raise GGMergeError("not a valid safetensors file (header is not a JSON object)", path=path)
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise GGMergeError("malformed safetensors header entry", path=path, tensor=name) from None
        if end > data_len or begin > end:
            raise GGMergeError(
                f"tensor data [{begin}, {end}) lies beyond the end of the file ({data_len} data bytes): "
                "the file is truncated", path=path, tensor=name)
    return header


class SafetensorsSource:
    """A source over an HF folder (single or sharded safetensors) or one ``.safetensors`` file.

    ``path`` is a folder holding ``config.json`` and ``*.safetensors`` (with
    ``model.safetensors.index.json`` when sharded), or a single ``.safetensors`` file whose config
    and tokenizer are taken from its folder.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._headers: dict[Path, dict] = {}
        if self.path.is_file():
            self.folder = self.path.parent
            shard_of = {n: self.path for n in self._tensor_names(self.path)}
        elif self.path.is_dir():
            self.folder = self.path
            shard_of = self._scan_folder()
        else:
            raise GGMergeError("no such file or folder", path=self.path)
        # shard -> open safe_open handle; opened lazily, kept until close()
        self._handles: dict[Path, object] = {}
        self._shard_of: dict[str, Path] = {}
        for name, shard in shard_of.items():
            if any(rx.match(name) for rx in llama.IGNORED):
                log.debug("%s: ignoring %s (recomputed by the model)", shard, name)
                continue
            self._shard_of[name] = shard
        if not self._shard_of:
            raise GGMergeError("holds no tensors", path=self.path)
        self._config: dict | None = None

    # -- opening ---------------------------------------------------------------------------------
    def _tensor_names(self, shard: Path) -> list[str]:
        header = _read_header(shard)
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
        self._info(name)
        shard = self._shard_of[name]
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

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsSource({str(self.path)!r}, {len(self._shard_of)} tensors)"

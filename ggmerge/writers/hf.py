"""The HF writer: a model folder of sharded safetensors (bf16 by default), streamed one tensor at a time.

A safetensors file starts with a JSON header listing every tensor's offsets, so a shard cannot be
written front to back before all of its tensors are known. When the caller announces the ``layout``
(every tensor's name and shape, in order — a merge plan knows it), each shard's header is written first
and the tensors go straight behind it. Otherwise, rather than holding a shard (up to
``max_shard_bytes``) in memory, each tensor's bytes are appended to a spill file as they arrive; when a
shard is full its header is written and the spill is copied behind it in the kernel
(``os.copy_file_range``). Memory stays at one tensor; disk holds at most one extra shard.

The byte layout follows the safetensors format exactly as ``safetensors.torch.save_file`` writes it
(8-byte little-endian header length, compact JSON with ``__metadata__`` first, padded with spaces to a
multiple of 8, tensor data contiguous and in header order), so a file whose tensors are added in
safetensors' own order (by dtype, then name) is byte-identical to safetensors' output.

The whole folder is written under a temporary name and renamed into place by
:func:`ggmerge.atomic.atomic_path` on :meth:`HFWriter.finish`; an exception (or :meth:`HFWriter.abort`)
leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable
from pathlib import Path, PurePosixPath

import torch

from ..atomic import atomic_path
from ..dtypes import CONFIG_NAME, STORAGE_NAME, parse_dtype, round_to
from ..errors import GGMergeError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
_CHUNK = 1 << 18  # elements rounded and written at a time
SINGLE_NAME = "model.safetensors"


@dataclass
class _Shard:
    number: int
    spill: Path | None  # None: the header was written first (the layout was known in advance)
    fh: object
    entries: list[tuple[str, str, list[int], int, int]] = field(default_factory=list)
    size: int = 0


def safetensors_header(entries, metadata: dict[str, str] | None) -> bytes:
    """The header bytes (length prefix included) for ``entries`` = [(name, dtype, shape, begin, end)]."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def _copy_into(src: Path, dst_fh) -> None:
    """Append ``src`` to the open file ``dst_fh`` (in the kernel where the OS allows it)."""
    dst_fh.flush()
    start = dst_fh.tell()
    with open(src, "rb") as s:
        n = os.fstat(s.fileno()).st_size
        try:
            done = 0
            while done < n:
                k = os.copy_file_range(s.fileno(), dst_fh.fileno(), n - done)
                if k == 0:
                    raise OSError("copy_file_range made no progress")
                done += k
            dst_fh.seek(0, os.SEEK_END)
            return
        except (AttributeError, OSError):  # no copy_file_range here (or across filesystems)
            pass
        s.seek(0)
        dst_fh.seek(start)
        dst_fh.truncate(start)
        shutil.copyfileobj(s, dst_fh, 16 << 20)


def _safe_relpath(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise GGMergeError("extra file names must be relative paths inside the model folder", key=name)
    return p


class HFWriter:
    """Stream tensors into an HF model folder.

    >>> with HFWriter(out, max_shard_bytes=2e9) as w:      # doctest: +SKIP
    ...     for name in plan: w.add(name, tensor_f32)
    ...     w.finish(config, vocab=vocab, extra_files={"README.md": card})

    ``metadata`` (str → str) is stored in every shard's ``__metadata__`` beside ``{"format": "pt"}``.
    Leaving the ``with`` block without :meth:`finish` (or with an exception) discards everything.
    """

    def __init__(self, folder: str | os.PathLike, *, max_shard_bytes: float = 5e9,
                 dtype: torch.dtype | str = torch.bfloat16, metadata: dict | None = None,
                 overwrite: bool = True, layout: list[tuple[str, tuple[int, ...]]] | None = None) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise GGMergeError("writing safetensors needs a little-endian machine")
        self.folder = Path(folder)
        self.dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        if self.dtype not in STORAGE_NAME:
            raise GGMergeError(f"HF output dtype must be bf16, f16 or f32, not {self.dtype}", key="dtype")
        self._itemsize = torch.empty(0, dtype=self.dtype).element_size()
        self.max_shard_bytes = int(max_shard_bytes)
        if self.max_shard_bytes <= 0:
            raise GGMergeError("max_shard_bytes must be positive", key="max_shard_bytes")
        self.metadata = {"format": "pt"}
        for k, v in (metadata or {}).items():
            self.metadata[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        self._atomic = atomic_path(self.folder, overwrite=overwrite)
        self.tmp: Path = self._atomic.__enter__()
        self._open = True
        try:
            self.tmp.mkdir(parents=True)
        except OSError as exc:
            self.abort()
            from ..atomic import _explain

            raise _explain(exc, self.folder) from None
        self._shards: list[_Shard] = []
        self._cur: _Shard | None = None
        # with the whole layout (every tensor's name and shape, in order) known in advance, each shard's
        # header is written first and the tensors straight behind it: no spill file to copy
        self._planned = self._split(layout) if layout is not None else None
        self._names: set[str] = set()
        self.total_size = 0

    # -- tensors ---------------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Round ``tensor`` (float32, or already in the output dtype) to the output dtype and append it
        to the current shard."""
        self.add_rows(name, tuple(tensor.shape), [tensor])

    def add_rows(self, name: str, shape: tuple[int, ...], parts: Iterable[torch.Tensor]) -> None:
        """Append tensor ``name`` of ``shape`` given as consecutive row blocks (float32 or the output
        dtype), so a large tensor never has to be whole in memory."""
        self._check_open()
        if name in self._names:
            raise GGMergeError("tensor written twice", path=self.folder, tensor=name)
        numel = math.prod(shape)
        nbytes = numel * self._itemsize
        if self._planned is not None:
            n = len(self._names)
            if n >= len(self._flat_plan) or self._flat_plan[n] != (name, tuple(shape)):
                self.abort()
                raise GGMergeError("tensor written out of the announced layout", path=self.folder, tensor=name)
        try:
            if self._cur is None or (self._cur.entries and self._cur.size + nbytes > self.max_shard_bytes):
                self._roll()
            cur = self._cur
            written = 0
            for part in parts:
                t = part.detach()
                if t.dtype not in (torch.float32, self.dtype):
                    t = t.to(torch.float32)
                flat = t.contiguous().cpu().reshape(-1)
                # round and write in fixed-size chunks: the extra memory is one chunk, not a second copy
                # of the tensor, and equal-sized buffers are reused by malloc instead of fragmenting it
                for start in range(0, flat.numel(), _CHUNK):
                    piece = round_to(flat[start:start + _CHUNK], self.dtype)
                    cur.fh.write(piece.view(torch.uint8).numpy().data)
                written += flat.numel()
            if written != numel:
                raise GGMergeError(f"{written} values given for a tensor of shape {list(shape)}",
                                   path=self.folder, tensor=name)
        except BaseException as exc:
            # a half-written tensor would shift every later offset: the output is lost, say so once
            self.abort()
            if isinstance(exc, OSError):
                raise GGMergeError(f"cannot write: {exc.strerror or exc}", path=self.folder,
                                   tensor=name) from None
            raise
        cur.entries.append((name, STORAGE_NAME[self.dtype], list(shape), cur.size, cur.size + nbytes))
        cur.size += nbytes
        self.total_size += nbytes
        self._names.add(name)

    def _split(self, layout) -> list[list[tuple[str, str, list[int], int, int]]]:
        """The shards ``add_rows`` will make for ``layout``, as header entries (the same rule: a new
        shard when the next tensor would take a non-empty one past ``max_shard_bytes``)."""
        shards: list[list] = []
        size = 0
        self._flat_plan = [(name, tuple(int(d) for d in shape)) for name, shape in layout]
        for name, shape in self._flat_plan:
            nbytes = math.prod(shape) * self._itemsize
            if not shards or (shards[-1] and size + nbytes > self.max_shard_bytes):
                shards.append([])
                size = 0
            shards[-1].append((name, STORAGE_NAME[self.dtype], list(shape), size, size + nbytes))
            size += nbytes
        return shards

    def _roll(self) -> None:
        if self._cur is not None:
            self._close_shard(self._cur)
        n = len(self._shards) + 1
        if self._planned is not None:
            path = self.tmp / f".shard-{n:05d}.safetensors"
            fh = open(path, "wb")
            fh.write(safetensors_header(self._planned[n - 1], self.metadata))
            self._cur = _Shard(n, None, fh)
        else:
            spill = self.tmp / f".shard-{n:05d}.spill"
            self._cur = _Shard(n, spill, open(spill, "wb"))
        self._shards.append(self._cur)

    def _close_shard(self, shard: _Shard) -> None:
        shard.fh.close()
        if shard.spill is None:
            if shard.entries != self._planned[shard.number - 1]:
                raise GGMergeError("the tensors written differ from the announced layout", path=self.folder)
            return
        out = self.tmp / f".shard-{shard.number:05d}.safetensors"
        with open(out, "wb") as f:
            f.write(safetensors_header(shard.entries, self.metadata))
            _copy_into(shard.spill, f)
        shard.spill.unlink()
        log.debug("%s: shard %d closed (%d tensors, %d bytes)", self.folder, shard.number,
                  len(shard.entries), shard.size)

    # -- the folder ------------------------------------------------------------------------------
    def finish(self, config: dict, vocab=None,
               extra_files: dict[str, bytes | str] | Callable[[Path], dict[str, bytes | str]] | None = None,
               generation_config: dict | None = None) -> Path:
        """Close the last shard; write the index, config.json, generation_config.json, tokenizer files
        (from ``vocab`` via ``hf_files.write_hf``) and ``extra_files``; move the folder into place."""
        self._check_open()
        try:
            if self._cur is None:
                raise GGMergeError("no tensors were written", path=self.folder)
            if self._planned is not None and len(self._names) != len(self._flat_plan):
                missing = self._flat_plan[len(self._names)][0]
                raise GGMergeError("the announced layout is not complete", path=self.folder, tensor=missing)
            self._close_shard(self._cur)
            self._cur = None
            self._name_shards()
            self._write_json("config.json", self._config(config))
            self._write_json("generation_config.json", generation_config or _generation_config(config))
            if vocab is not None:
                from ..tokenizer.hf_files import write_hf

                write_hf(vocab, self.tmp)
            if callable(extra_files):  # files that depend on the finished shards (e.g. their hashes)
                extra_files = extra_files(self.tmp)
            for name, content in (extra_files or {}).items():
                p = self.tmp / _safe_relpath(name)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(content.encode("utf-8") if isinstance(content, str) else bytes(content))
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise GGMergeError(f"cannot write: {exc.strerror or exc}", path=self.folder) from None
            raise
        self._open = False
        self._atomic.__exit__(None, None, None)
        log.info("wrote %s (%d tensors, %d shard(s), %.2f GB)", self.folder, len(self._names),
                 len(self._shards), self.total_size / 1e9)
        return self.folder

    def shard_names(self) -> list[str]:
        n = len(self._shards)
        if n == 1:
            return [SINGLE_NAME]
        return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    def _name_shards(self) -> None:
        names = self.shard_names()
        weight_map: dict[str, str] = {}
        for shard, final in zip(self._shards, names):
            os.replace(self.tmp / f".shard-{shard.number:05d}.safetensors", self.tmp / final)
            for entry in shard.entries:
                weight_map[entry[0]] = final
        if len(names) > 1:
            # total_size counts tensor bytes only, as transformers' save_pretrained does
            self._write_json(INDEX_NAME, {"metadata": {"total_size": self.total_size},
                                          "weight_map": dict(sorted(weight_map.items()))})

    def _config(self, config: dict) -> dict:
        return hf_config(config, self.dtype)

    def _write_json(self, name: str, obj: dict) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                     encoding="utf-8")

    # -- lifetime --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self._open:
            raise GGMergeError("the writer is already finished or aborted", path=self.folder)

    def abort(self) -> None:
        """Discard everything written so far; nothing appears at ``folder``."""
        if not self._open:
            return
        self._open = False
        for shard in getattr(self, "_shards", []):
            if not shard.fh.closed:
                shard.fh.close()
        err = GGMergeError("aborted", path=self.folder)
        self._atomic.__exit__(GGMergeError, err, None)

    def __enter__(self) -> "HFWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._open:
            self.abort()


def hf_config(config: dict, dtype: torch.dtype) -> dict:
    """The config.json the writer stores for a model of ``dtype``."""
    cfg = dict(config)
    # transformers 5 reads "dtype", 4.x and most other tools "torch_dtype": say it both ways
    cfg["torch_dtype"] = CONFIG_NAME[dtype]
    cfg["dtype"] = CONFIG_NAME[dtype]
    return cfg


def _generation_config(config: dict) -> dict:
    """What ``GenerationConfig.from_model_config`` keeps: the special token ids."""
    out: dict = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            out[key] = config[key]
    return out

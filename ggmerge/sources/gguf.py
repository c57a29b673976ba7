"""GGUF files (F32/F16/BF16 or any type gguf-py dequantizes) as sources of float32 HF tensors.

``gguf.GGUFReader`` parses the header (metadata, tensor names, types, offsets) through its memory map;
tensor bytes are read with plain ``readinto`` calls into a fresh buffer when a tensor is loaded, then
dequantized. Not through the map: pages of a mapped file, once touched, count in the resident set
until the mapping goes away, so dequantizing a whole model from the map would make peak RSS grow to
the file's size; read into a buffer, the bytes live in the page cache (not RSS) and in memory only
while the tensor does. The file's ``general.architecture`` picks the family (:mod:`ggmerge.arch`),
which maps names back to Hugging Face names and undoes what the converter did to values
(``Family.from_gguf``: for llama, Q and K un-permuted from llama.cpp's interleaved RoPE layout, the
inverse of ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``, with the head counts stored in the
file); shapes are reported in HF order (GGUF lists ``ne0`` — the row length — first).
The config and the tokenizer folder are synthesised from the GGUF metadata.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import gguf
import numpy as np
import torch

from ..arch import DERIVED, family_for_gguf
from ..errors import GGMergeError, did_you_mean
from .gguf_data import dequantizable, field, open_reader, read_tensor_data

log = logging.getLogger(__name__)

QType = gguf.GGMLQuantizationType


class GGUFSource:
    """A GGUF file of a supported architecture (:mod:`ggmerge.arch`), seen under HF names and layout."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.reader = open_reader(self.path)
        self.family = family_for_gguf(field(self.reader, "general.architecture"), path=self.path)
        self._tensors: dict[str, object] = {}
        for t in self.reader.tensors:
            if t.name in DERIVED:
                log.debug("%s: skipping %s (derived from config by HF)", self.path, t.name)
                continue
            hf = self.family.gguf_to_hf(t.name)
            if hf is None:
                raise GGMergeError(f"tensor has no Hugging Face counterpart in the {self.family.gguf_arch} "
                                   "architecture",
                                   path=self.path, tensor=t.name)
            if not dequantizable(t.tensor_type):
                raise GGMergeError(
                    f"tensor type {t.tensor_type.name} cannot be dequantized by gguf-py "
                    f"{getattr(gguf, '__version__', '')}".rstrip(), path=self.path, tensor=t.name)
            self._tensors[hf] = t
        if not self._tensors:
            raise GGMergeError("holds no tensors (a vocab-only GGUF?)", path=self.path)
        self._heads = self._head_counts()
        self._config: dict | None = None
        self._vocab = None
        self._tokdir: Path | None = None
        self._file = None  # unbuffered reader of tensor bytes, opened on the first load
        self._lock = threading.Lock()
        self._cleanup: weakref.finalize | None = None

    def _head_counts(self) -> dict:
        a = self.family.gguf_arch
        n_head = field(self.reader, f"{a}.attention.head_count")
        n_kv = field(self.reader, f"{a}.attention.head_count_kv", n_head)
        if n_head is None:
            raise GGMergeError("missing metadata: Q/K cannot be un-permuted without the head count",
                               path=self.path, key=f"{a}.attention.head_count")
        # head_count_kv may be stored per layer; the supported families use one value for all layers
        if isinstance(n_kv, list):
            if len(set(n_kv)) != 1:
                raise GGMergeError(f"per-layer KV head counts differ; not a {self.family.title} model",
                                   path=self.path, key=f"{a}.attention.head_count_kv")
            n_kv = n_kv[0]
        return {"num_attention_heads": int(n_head), "num_key_value_heads": int(n_kv)}

    # -- TensorSource ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._tensors)

    def _get(self, name: str):
        if self.reader is None:
            raise GGMergeError("source is closed", path=self.path, tensor=name)
        try:
            return self._tensors[name]
        except KeyError:
            raise GGMergeError(f"no such tensor{did_you_mean(name, self._tensors)}",
                               path=self.path, tensor=name) from None

    def gguf_name(self, name: str) -> str:
        return self._get(name).name

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF dims are ggml's ne[] (fastest-varying first); HF/numpy order is the reverse
        return tuple(int(d) for d in reversed(self._get(name).shape.tolist()))

    def dtype(self, name: str) -> str:
        return self._get(name).tensor_type.name

    def _read(self, t) -> np.ndarray:
        """A copy of ``t.data`` read from the file, not the map (see :mod:`.gguf_data`)."""
        if self._file is None:
            with self._lock:
                if self._file is None:
                    try:
                        self._file = open(self.path, "rb", buffering=0)
                    except OSError as exc:
                        raise GGMergeError(f"cannot read: {exc.strerror or exc}", path=self.path) from None
        return read_tensor_data(self._file, t, self.path)

    def load(self, name: str) -> torch.Tensor:
        t = self._get(name)
        data = self._read(t)
        if t.tensor_type == QType.BF16 and data.dtype == np.uint8 and data.size:
            # the same exact widening as gguf-py's BF16 dequantize (bits << 16), without its int32
            # temporary the size of the float32 result: one allocation instead of two
            w = torch.from_numpy(data.reshape(-1)).view(torch.bfloat16).float().reshape(self.shape(name))
        else:
            try:
                arr = gguf.quants.dequantize(data, t.tensor_type)
            except Exception as exc:  # noqa: BLE001 - a codec failure on this tensor's bytes
                raise GGMergeError(f"cannot dequantize {t.tensor_type.name}: {exc}",
                                   path=self.path, tensor=t.name) from None
            # F32 comes back as the read buffer itself (ours, writable); copy anything not plain C float32
            if arr.dtype != np.float32 or not arr.flags.writeable or not arr.flags.c_contiguous:
                arr = np.array(arr, dtype=np.float32, order="C")
            w = torch.from_numpy(arr.reshape(self.shape(name)))
        del data
        return self.family.from_gguf(name, w, self._heads, path=self.path, gguf_name=t.name)

    def config(self) -> dict:
        if self._config is None:
            self._config = self._build_config()
        return dict(self._config)

    def _build_config(self) -> dict:
        try:
            cfg = dict(self.family.config_from_gguf(self.reader))
        except GGMergeError as exc:
            if exc.path is None:
                exc.path = self.path
            raise
        # a GGUF without output.weight ties the LM head to the embedding (llama.cpp does the same)
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        for key, value in self._heads.items():
            cfg.setdefault(key, value)
        return cfg

    def vocab(self):
        """The GGUF vocabulary as a :class:`~ggmerge.tokenizer.vocab.Vocab` (None if the file has none)."""
        if self._vocab is None and field(self.reader, "tokenizer.ggml.tokens") is not None:
            from ..tokenizer.gguf_vocab import read_gguf

            try:
                self._vocab = read_gguf(self.reader)
            except GGMergeError as exc:
                if exc.path is None:
                    exc.path = self.path
                raise
        return self._vocab

    def tokenizer_dir(self) -> Path | None:
        """HF tokenizer files rebuilt from the GGUF vocab, in a temporary folder removed on close."""
        if self._tokdir is None:
            vocab = self.vocab()
            if vocab is None:
                return None
            from ..tokenizer.hf_files import write_hf

            d = Path(tempfile.mkdtemp(prefix="ggmerge-gguf-tokenizer-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, d, True)
            try:
                write_hf(vocab, d)
            except BaseException:
                self._cleanup()
                raise
            self._tokdir = d
        return self._tokdir

    def close(self) -> None:
        """Remove the synthesised tokenizer folder and drop the memory map."""
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
        self._tokdir = None
        self._tensors = {}
        self.reader = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "GGUFSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFSource({str(self.path)!r}, {len(self._tensors)} tensors)"

"""GGUF → HF model folder: ``ggmerge convert MODEL.gguf -o HF_DIR``.

A thin pipe: :class:`~ggmerge.sources.gguf.GGUFSource` (dequantize, HF names, Q/K un-permuted, config
and vocabulary from the metadata) into :class:`~ggmerge.writers.hf.HFWriter` (sharded safetensors,
tokenizer files). One tensor is in memory at a time.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .. import progress as progress_bar
from ..dtypes import parse_dtype
from ..sources.gguf import GGUFSource
from ..writers.hf import HFWriter

log = logging.getLogger(__name__)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bf16",
                 *, max_shard_bytes: float = 5e9, progress: bool = True) -> Path:
    """Write the model in ``gguf_path`` as an HF folder at ``out_dir`` in ``dtype`` (bf16, f16 or f32).

    Quantized tensors are dequantized to float32 first; choose ``f32`` to keep those values exactly.
    """
    src = GGUFSource(gguf_path)
    try:
        names = src.names()
        config = src.config()  # before writing anything: a bad header fails here, not half-way
        vocab = src.vocab()
        dt = parse_dtype(dtype)
        itemsize = torch.empty((), dtype=dt).element_size()
        sizes = {n: itemsize * _numel(src.shape(n)) for n in names}
        with HFWriter(out_dir, dtype=dt, max_shard_bytes=max_shard_bytes) as writer:
            with progress_bar.track(f"{Path(gguf_path).name} → {Path(out_dir).name}", sum(sizes.values()),
                                    len(names), enabled=progress) as bar:
                for name in names:
                    writer.add(name, src.load(name))
                    bar.advance(sizes[name], 1, name)
            return writer.finish(config, vocab=vocab)
    finally:
        src.close()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n

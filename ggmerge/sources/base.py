"""The tensor-source protocol: the only thing the rest of ggmerge knows about input files.

A source is opened once, lists its tensors under **Hugging Face names** (``model.layers.0.self_attn.q_proj.weight``),
reports shape and stored dtype without reading data, and loads one tensor at a time as a float32
``torch.Tensor`` (read with positional reads, one tensor at a time; never the whole model). A source also
carries the model's ``config.json`` dict and a path to a folder with its tokenizer files (for GGUF
sources that folder is synthesised from the GGUF vocabulary).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TensorSource(Protocol):
    #: the file or folder the user named (used in every error message)
    path: Path

    def names(self) -> list[str]:
        """HF tensor names, in file order."""

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape (rows, cols) of ``name`` without reading data."""

    def dtype(self, name: str) -> str:
        """Stored type as an upper-case string: 'F32', 'F16', 'BF16', 'Q4_K', ..."""

    def load(self, name: str) -> torch.Tensor:
        """The tensor as contiguous float32 on CPU, in HF layout (GGUF Q/K permutation undone)."""

    def config(self) -> dict:
        """The model's HF ``config.json`` as a dict (synthesised for GGUF)."""

    def tokenizer_dir(self) -> Path | None:
        """A folder holding this model's tokenizer files (tokenizer.model / tokenizer.json /
        tokenizer_config.json), or None if it has none."""

    def close(self) -> None:
        """Release memory maps."""

"""Casts happen only at the edges; this is the one place that rounds float32 to 16-bit."""
from __future__ import annotations

import torch


def round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float32 tensor to ``dtype`` (round-to-nearest-even, as torch and ggml do)."""
    if t.dtype == dtype:
        return t
    return t.to(dtype)


def round_trip(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values exactly representable in ``dtype`` (what a 16-bit file would hold)."""
    if dtype == torch.float32:
        return t.float()
    return t.to(dtype).float()


NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
}


#: the float dtypes a tensor is stored in (safetensors' and GGUF sources' ``dtype()`` names) ↔ torch
FLOAT_STORAGE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
STORAGE_NAME = {t: n for n, t in FLOAT_STORAGE.items()}
#: torch dtype → the name ``config.json`` gives it (``torch_dtype`` / ``dtype``)
CONFIG_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_dtype(name: str) -> torch.dtype:
    from .errors import GGMergeError, did_you_mean

    try:
        return NAMES[str(name).lower()]
    except KeyError:
        raise GGMergeError(f"unknown dtype '{name}'{did_you_mean(name, NAMES)}", key="dtype") from None

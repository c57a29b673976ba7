"""The quant-type table: for each GGML type we can write, its block geometry and its codec.

Block size and bytes per block come from gguf-py (``GGML_QUANT_SIZES``), the one source of truth
shared with the GGUF reader/writer. ``chunk_blocks`` bounds how many blocks a codec sees at once: big
enough to amortise numpy's per-call overhead, small enough that its temporaries stay in cache and
peak memory stays bounded whatever the tensor size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from . import kquants, kquants_low, legacy

Codec = Callable[[np.ndarray], np.ndarray]  # float32 (n_blocks, block_size) -> uint8 (n_blocks, type_size)


@dataclass(frozen=True)
class QuantType:
    qtype: Q
    codec: Codec
    chunk_blocks: int
    mirrors: str  # the ggml function whose bytes the codec reproduces

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]


_FLOAT_CHUNK = 1 << 14  # blocks of one element: plain casts

TABLE: dict[Q, QuantType] = {t.qtype: t for t in [
    QuantType(Q.F32, legacy.quantize_f32, _FLOAT_CHUNK * 64, "memcpy"),
    QuantType(Q.F16, legacy.quantize_f16, _FLOAT_CHUNK * 64, "ggml_fp32_to_fp16_row"),
    QuantType(Q.BF16, legacy.quantize_bf16, _FLOAT_CHUNK * 64, "ggml_fp32_to_bf16_row_ref"),
    QuantType(Q.Q8_0, legacy.quantize_q8_0, 1 << 13, "quantize_row_q8_0_ref"),
    QuantType(Q.Q4_0, legacy.quantize_q4_0, 1 << 13, "quantize_row_q4_0_ref"),
    QuantType(Q.Q4_1, legacy.quantize_q4_1, 1 << 13, "quantize_row_q4_1_ref"),
    QuantType(Q.Q5_0, legacy.quantize_q5_0, 1 << 13, "quantize_row_q5_0_ref"),
    QuantType(Q.Q5_1, legacy.quantize_q5_1, 1 << 13, "quantize_row_q5_1_ref"),
    QuantType(Q.Q2_K, kquants_low.quantize_q2_k, 512, "quantize_row_q2_K_ref"),
    QuantType(Q.Q3_K, kquants_low.quantize_q3_k, 1024, "quantize_row_q3_K_ref"),
    QuantType(Q.Q4_K, kquants.quantize_q4_k, 256, "quantize_row_q4_K_ref"),
    QuantType(Q.Q5_K, kquants.quantize_q5_k, 256, "quantize_row_q5_K_ref"),
    QuantType(Q.Q6_K, kquants.quantize_q6_k, 256, "quantize_row_q6_K_ref"),
]}

"""The quant-type table: for each GGML type we can write, its block geometry and its kernel.

Block size and bytes per block come from gguf-py (``GGML_QUANT_SIZES``), the one source of truth
shared with the GGUF reader/writer. Kernels are numba functions ``kernel(x, out)`` over contiguous
float32 blocks and their uint8 encoding (:mod:`.legacy`, :mod:`.kquants`, :mod:`.kquants_low`). They
are named here, not imported: importing numba and loading (or, the first time on a machine,
compiling) a kernel happens when a tensor of that type is first quantized, never at import.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType


@dataclass(frozen=True)
class QuantType:
    qtype: QType
    #: "module.function" of the kernel in this package; None for F32 (a copy of the bytes)
    kernel_name: str | None
    mirrors: str  # the ggml function whose bytes the kernel reproduces
    #: "module.function" of the kernel taking importance weights, ``kernel(x, out, qw)`` over whole
    #: rows (:mod:`.weighted`); None where ggml ignores them (F32, F16, BF16, Q8_0). A type with only
    #: this kernel (IQ4_NL, IQ4_XS) runs it with empty ``qw`` (C's NULL) when there is no imatrix.
    weighted_name: str | None = None

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def checks_finite(self) -> bool:
        """Block types refuse NaN/inf (ggml would write garbage); float types store them."""
        return self.qtype not in (QType.F32, QType.F16, QType.BF16)

    def kernel(self) -> Callable:
        return _load(self.kernel_name)

    def weighted_kernel(self) -> Callable:
        return _load(self.weighted_name)


def _load(dotted: str) -> Callable:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(f".{module}", __package__), name)


TABLE: dict[QType, QuantType] = {t.qtype: t for t in [
    QuantType(QType.F32, None, "memcpy"),
    QuantType(QType.F16, "legacy.quantize_f16", "ggml_fp32_to_fp16_row"),
    QuantType(QType.BF16, "legacy.quantize_bf16", "ggml_fp32_to_bf16_row_ref"),
    QuantType(QType.Q8_0, "legacy.quantize_q8_0", "quantize_row_q8_0_ref"),
    QuantType(QType.Q4_0, "legacy.quantize_q4_0", "quantize_row_q4_0_ref / quantize_row_q4_0_impl",
              "weighted.quantize_q4_0_w"),
    QuantType(QType.Q4_1, "legacy.quantize_q4_1", "quantize_row_q4_1_ref / quantize_row_q4_1_impl",
              "weighted.quantize_q4_1_w"),
    QuantType(QType.Q5_0, "legacy.quantize_q5_0", "quantize_row_q5_0_ref / quantize_row_q5_0_impl",
              "weighted.quantize_q5_0_w"),
    QuantType(QType.Q5_1, "legacy.quantize_q5_1", "quantize_row_q5_1_ref / quantize_row_q5_1_impl",
              "weighted.quantize_q5_1_w"),
    QuantType(QType.Q2_K, "kquants_low.quantize_q2_k", "quantize_row_q2_K_ref / quantize_row_q2_K_impl",
              "weighted.quantize_q2_k_w"),
    QuantType(QType.Q3_K, "kquants_low.quantize_q3_k", "quantize_row_q3_K_ref / quantize_row_q3_K_impl",
              "weighted.quantize_q3_k_w"),
    QuantType(QType.Q4_K, "kquants.quantize_q4_k", "quantize_row_q4_K_ref / quantize_row_q4_K_impl",
              "weighted.quantize_q4_k_w"),
    QuantType(QType.Q5_K, "kquants.quantize_q5_k", "quantize_row_q5_K_ref / quantize_row_q5_K_impl",
              "weighted.quantize_q5_k_w"),
    QuantType(QType.Q6_K, "kquants.quantize_q6_k", "quantize_row_q6_K_ref / quantize_row_q6_K_impl",
              "weighted.quantize_q6_k_w"),
    QuantType(QType.IQ4_NL, None, "quantize_iq4_nl", "weighted.quantize_iq4_nl"),
    QuantType(QType.IQ4_XS, None, "quantize_iq4_xs", "weighted.quantize_iq4_xs"),
]}

"""llama.cpp file types ("Q4_K_M", …): name ↔ ``LlamaFileType`` ↔ default tensor type.

A *file type* names a mixture: most 2-D weights get its default tensor type, and the per-tensor
policy (:mod:`.policy`) bumps or demotes some of them. The table mirrors llama-quantize's
``QUANT_OPTIONS`` (tools/quantize/quantize.cpp) for the names, and ``llama_ftype_get_default_type``
(src/llama-quant.cpp) for the default types. Only the file types whose every possible per-tensor
type we can encode are listed; parsing is case-insensitive, accepts llama-quantize's aliases
(``Q4_K`` = ``Q4_K_M``) and its numeric ids, and suggests the nearest name on a typo.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType as F

from ggmerge.errors import GGMergeError, did_you_mean


@dataclass(frozen=True)
class FileType:
    #: canonical upper-case name, as llama-quantize prints it and as it goes into file names
    name: str
    #: the value stored in ``general.file_type``
    ftype: F
    #: tensor type most 2-D weights get (llama_ftype_get_default_type)
    default: QType

    @property
    def quantized(self) -> bool:
        """False for F32/F16/BF16, where llama.cpp applies no per-tensor rules at all."""
        return self.default not in (QType.F32, QType.F16, QType.BF16)


_TABLE = [
    FileType("F32", F.ALL_F32, QType.F32),
    FileType("F16", F.MOSTLY_F16, QType.F16),
    FileType("BF16", F.MOSTLY_BF16, QType.BF16),
    FileType("Q8_0", F.MOSTLY_Q8_0, QType.Q8_0),
    FileType("Q4_0", F.MOSTLY_Q4_0, QType.Q4_0),
    FileType("Q4_1", F.MOSTLY_Q4_1, QType.Q4_1),
    FileType("Q5_0", F.MOSTLY_Q5_0, QType.Q5_0),
    FileType("Q5_1", F.MOSTLY_Q5_1, QType.Q5_1),
    FileType("Q2_K", F.MOSTLY_Q2_K, QType.Q2_K),
    FileType("Q2_K_S", F.MOSTLY_Q2_K_S, QType.Q2_K),
    FileType("Q3_K_S", F.MOSTLY_Q3_K_S, QType.Q3_K),
    FileType("Q3_K_M", F.MOSTLY_Q3_K_M, QType.Q3_K),
    FileType("Q3_K_L", F.MOSTLY_Q3_K_L, QType.Q3_K),
    FileType("Q4_K_S", F.MOSTLY_Q4_K_S, QType.Q4_K),
    FileType("Q4_K_M", F.MOSTLY_Q4_K_M, QType.Q4_K),
    FileType("Q5_K_S", F.MOSTLY_Q5_K_S, QType.Q5_K),
    FileType("Q5_K_M", F.MOSTLY_Q5_K_M, QType.Q5_K),
    FileType("Q6_K", F.MOSTLY_Q6_K, QType.Q6_K),
    FileType("IQ4_NL", F.MOSTLY_IQ4_NL, QType.IQ4_NL),
    FileType("IQ4_XS", F.MOSTLY_IQ4_XS, QType.IQ4_XS),
]

#: canonical name → FileType
FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in _TABLE}

#: llama-quantize's short aliases for the medium K-quant mixtures
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

_BY_ID = {int(ft.ftype): ft for ft in _TABLE}


def parse_ftype(text: str) -> FileType:
    """``'q4_k_m'``, ``'Q4_K'``, ``'q4-k-m'`` or ``'15'`` → the Q4_K_M :class:`FileType`."""
    key = str(text).strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in FILE_TYPES:
        return FILE_TYPES[key]
    if key.isdigit() and int(key) in _BY_ID:
        return _BY_ID[int(key)]
    choices = list(FILE_TYPES) + list(ALIASES)
    raise GGMergeError(
        f"unknown quantization type '{text}'{did_you_mean(key, choices)}; "
        f"supported: {', '.join(FILE_TYPES)}",
        key="type",
    )


def ftype_by_id(value: int) -> FileType | None:
    """The FileType stored as ``general.file_type = value``, or None if it is not one of ours."""
    return _BY_ID.get(int(value))

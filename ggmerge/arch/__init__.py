"""Architecture knowledge as data, one module per family."""
from __future__ import annotations

from ..errors import GGMergeError
from . import llama

#: HF ``architectures[0]`` → family module
FAMILIES = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": llama,
}


def family_for(config: dict, path=None):
    archs = config.get("architectures") or []
    for a in archs:
        if a in FAMILIES:
            return FAMILIES[a]
    raise GGMergeError(
        f"architecture {archs or '(none in config.json)'} is not supported "
        f"(supported: {', '.join(sorted(FAMILIES))})",
        path=path,
    )

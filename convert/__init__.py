"""GGUF export: HF ↔ GGUF conversion, the streaming GGUF writer, and the quantizers.

Installed as ``ggmerge.convert`` (the folder is ``convert/`` at the top of the repository).
"""
from __future__ import annotations

from pathlib import Path


def convert(input: str, output: str, *, outtype: str = "bf16", chat_template: str | None = None,
            force: bool = False) -> Path:
    """``ggmerge convert``: an HF folder becomes a GGUF file; a ``.gguf`` file becomes an HF folder."""
    from ..errors import GGMergeError

    src, dst = Path(input), Path(output)
    if dst.exists() and dst.resolve() == src.resolve():
        raise GGMergeError("the output would overwrite the input; name another output with -o", path=dst)
    if dst.exists() and not force:
        raise GGMergeError("output already exists (use --force to replace it)", path=dst)
    if src.suffix.lower() == ".gguf":
        from .gguf_to_hf import convert_gguf

        if chat_template is not None:
            raise GGMergeError("--chat-template applies to HF → GGUF conversion only", path=src)
        return convert_gguf(src, dst, dtype=outtype)
    from .hf_to_gguf import convert_hf

    return convert_hf(src, dst, outtype=outtype, chat_template=chat_template)

"""One in-memory vocabulary, whatever file it came from.

Readers build a :class:`Vocab` from an HF tokenizer folder (``hf_vocab.read_hf``) or from GGUF
metadata (``gguf_vocab.read_gguf``); writers put it into GGUF metadata (``gguf_vocab.write_vocab``) or
back into HF tokenizer files (``hf_files.write_hf``). The union tokenizer produces one too.

Token types use gguf-py's ``gguf.TokenType`` numbering (NORMAL=1, UNKNOWN=2, CONTROL=3,
USER_DEFINED=4, UNUSED=5, BYTE=6), which is also what llama.cpp reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Vocab:
    #: "llama" for SentencePiece (tokens + scores), "gpt2" for byte-level BPE (tokens + merges)
    model: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    #: BPE merges as "a b" strings (gpt2 only)
    merges: list[str] = field(default_factory=list)
    #: llama.cpp pre-tokenizer name for gpt2 vocabularies (e.g. "smollm", "llama-bpe"); None for SPM
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    #: llama.cpp's ``add_sep_token`` (a separator between the two texts of a pair); None: the tokenizer
    #: files do not say, and (as gguf-py's SpecialVocab) nothing is written
    add_sep: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    #: serialized SentencePiece ModelProto when the vocabulary came from a real tokenizer.model
    #: (kept so normalizer/byte-fallback settings travel exactly); None otherwise
    spm_proto: bytes | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def index(self) -> dict[str, int]:
        """token string → id (first occurrence wins)."""
        out: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            out.setdefault(t, i)
        return out

"""Write a :class:`Vocab` as HF tokenizer files that AutoTokenizer (and llama.cpp's converter) load.

SentencePiece vocabularies (``model == "llama"``) get:
  ``tokenizer.model``       the kept proto byte for byte when its pieces are still the vocabulary's
                            first tokens, else one built by :func:`spm_proto.build`;
  ``tokenizer_config.json`` ``LlamaTokenizer``, specials, add_bos/eos, ``legacy: true`` and the
                            added tokens (ids past the proto, and proto ids that HF re-types);
  ``special_tokens_map.json``.
  No ``tokenizer.json``: transformers (4 and 5) converts ``tokenizer.model`` on load, making every
  control / user-defined piece an added token, and encodes exactly as sentencepiece does (checked
  in tests). A tokenizer.json made by the converter would be worse: transformers 5 rebuilds a
  LlamaTokenizer from its vocab and merges and keeps only the added tokens tokenizer_config.json
  lists, so control pieces such as ``[INST]`` would silently stop being special.
Byte-level BPE vocabularies (``model == "gpt2"``) get tokenizer.json built directly (BPE model,
merges, the pre-tokenizer for ``vocab.pre``), tokenizer_config.json and special_tokens_map.json.

Each file is written atomically. Files that would contradict ours are removed: a stale
``tokenizer.json`` beside a SentencePiece model (transformers prefers it), ``added_tokens.json``,
``chat_template.jinja``/``.json`` (readers prefer them over tokenizer_config.json).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..atomic import atomic_path
from ..errors import GGMergeError
from . import spm_proto
from .hf_vocab import ADDED_SCORE, IGNORE_MERGES, PRE_TOKENIZERS, SPECIAL_NAMES
from .spm_proto import CONTROL, USER_DEFINED
from .vocab import Vocab

log = logging.getLogger(__name__)

STALE = ("added_tokens.json", "chat_template.jinja", "chat_template.json")
STALE_SPM = STALE + ("tokenizer.json",)


def write_hf(vocab: Vocab, folder: str | os.PathLike) -> list[Path]:
    """Write the tokenizer files for ``vocab`` into ``folder`` (created if needed); returns their paths."""
    folder = Path(folder)
    if vocab.model == "llama":
        files, stale = _spm_files(vocab), STALE_SPM
    elif vocab.model == "gpt2":
        files, stale = _bpe_files(vocab), STALE
    else:
        raise GGMergeError(f"cannot write a {vocab.model!r} tokenizer as HF files (llama or gpt2 only)",
                           path=folder, key="tokenizer.ggml.model")
    folder.mkdir(parents=True, exist_ok=True)
    for name in stale:
        if (folder / name).is_file():
            log.info("removing %s: it would override the tokenizer files written now", folder / name)
            (folder / name).unlink()
    out = []
    for name, data in files.items():
        with atomic_path(folder / name) as tmp:
            tmp.write_bytes(data)
        out.append(folder / name)
    return out


# ---------------------------------------------------------------------------------- SentencePiece

def _spm_files(vocab: Vocab) -> dict[str, bytes]:
    model, added = _spm_model(vocab)
    config = _config(vocab, added, tokenizer_class="LlamaTokenizer")
    # legacy=true: text after a special token starts a new SentencePiece fragment with its own "▁"
    # prefix. That is what llama.cpp does (and sentencepiece per fragment); with legacy=false
    # transformers drops that "▁" and the seed's turn-2 prompt ("…</s>\nUSER: …") tokenizes
    # differently in the HF model and in its GGUF. Text without special tokens is the same either way.
    config.update({"legacy": True, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
                   "use_default_system_prompt": False})
    if vocab.add_space_prefix is False:
        config["add_prefix_space"] = False
    return {"tokenizer.model": model, "tokenizer_config.json": _dump(config),
            "special_tokens_map.json": _dump(_special_map(vocab))}


def _spm_model(vocab: Vocab) -> tuple[bytes, list[int]]:
    """(tokenizer.model bytes, ids to list in added_tokens_decoder).

    The kept proto is written verbatim when the vocabulary only differs from it the way HF added
    tokens make it differ (see hf_vocab: re-typed ids at score -1000, ids appended after it).
    Otherwise every token becomes a piece of a rebuilt proto.
    """
    if vocab.spm_proto is not None:
        proto = spm_proto.parse(vocab.spm_proto)
        if spm_proto.matches(proto, vocab):
            n = len(proto.pieces)
            added: list[int] = []
            for i, p in enumerate(proto.pieces):
                if (float(p.score), int(p.type)) == (float(vocab.scores[i]), int(vocab.types[i])):
                    continue
                if not _is_added(vocab, i):
                    break
                added.append(i)
            else:
                # transformers numbers added tokens consecutively after the model, so a vocabulary
                # with [PADn] holes between added ids needs them as pieces (rebuilt proto below)
                tail = list(range(n, len(vocab)))
                if all(_is_added(vocab, i) for i in tail):
                    return vocab.spm_proto, added + tail
        log.info("vocabulary differs from its tokenizer.model; building a new SentencePiece model")
    return spm_proto.build(vocab), [i for i in range(len(vocab)) if _is_added(vocab, i)]


def _is_added(vocab: Vocab, i: int) -> bool:
    """Whether id i reads back from an added_tokens_decoder entry as it is (hf_vocab._read_spm)."""
    return vocab.types[i] in (CONTROL, USER_DEFINED) and vocab.scores[i] == ADDED_SCORE


# ---------------------------------------------------------------------------------- byte-level BPE

def _bpe_files(vocab: Vocab) -> dict[str, bytes]:
    added = [i for i in range(len(vocab)) if vocab.types[i] in (CONTROL, USER_DEFINED)]
    config = _config(vocab, added, tokenizer_class="PreTrainedTokenizerFast")
    # llama.cpp's "smollm" is "starcoder" without space clean-up on decode (llama-vocab.cpp)
    config["clean_up_tokenization_spaces"] = vocab.pre == "starcoder"
    return {"tokenizer.json": _dump(_bpe_tokenizer_json(vocab, added)),
            "tokenizer_config.json": _dump(config),
            "special_tokens_map.json": _dump(_special_map(vocab))}


def _bpe_tokenizer_json(vocab: Vocab, added: list[int]) -> dict:
    index: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        if index.setdefault(t, i) != i:
            raise GGMergeError(f"token {t!r} appears twice (ids {index[t]} and {i}); tokenizer.json "
                               "needs unique tokens", key="tokenizer.ggml.tokens")
    pre = PRE_TOKENIZERS.get(vocab.pre or "")
    if pre is None:
        log.warning("llama.cpp pre-tokenizer %r has no tokenizer.json equivalent in ggmerge; writing "
                    "GPT-2's, so transformers may split text differently from llama.cpp", vocab.pre)
        pre = PRE_TOKENIZERS["gpt-2"]
    merges = []
    for m in vocab.merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGMergeError(f"merge {m!r} is not two tokens", key="tokenizer.ggml.merges")
        merges.append(parts)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added_entry(vocab, i) | {"id": i} for i in added],
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": _post_processor(vocab),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": vocab.pre in IGNORE_MERGES, "vocab": index, "merges": merges},
    }


def _post_processor(vocab: Vocab) -> dict:
    """BOS/EOS insertion in the form gguf-py's SpecialVocab reads back (TemplateProcessing)."""
    bos = vocab.tokens[vocab.bos_id] if vocab.add_bos and vocab.bos_id is not None else None
    eos = vocab.tokens[vocab.eos_id] if vocab.add_eos and vocab.eos_id is not None else None
    if bos is None and eos is None:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}

    def seq(name: str, type_id: int) -> list[dict]:
        out = [{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos else []
        out.append({"Sequence": {"id": name, "type_id": type_id}})
        return out + ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if eos else [])

    specials = {t: {"id": t, "ids": [vocab.index()[t]], "tokens": [t]} for t in (bos, eos) if t}
    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": specials}


# ---------------------------------------------------------------------------------- shared parts

def _added_entry(vocab: Vocab, i: int) -> dict:
    return {"content": vocab.tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": vocab.types[i] == CONTROL}


def _config(vocab: Vocab, added: list[int], *, tokenizer_class: str) -> dict:
    config: dict = {"add_bos_token": bool(vocab.add_bos), "add_eos_token": bool(vocab.add_eos)}
    if vocab.add_sep is not None:
        config["add_sep_token"] = bool(vocab.add_sep)
    config["added_tokens_decoder"] = {str(i): _added_entry(vocab, i) for i in added}
    for name in SPECIAL_NAMES:
        tid = getattr(vocab, f"{name}_id")
        config[f"{name}_token"] = vocab.tokens[tid] if tid is not None and tid < len(vocab) else None
    if vocab.chat_template is not None:
        config["chat_template"] = vocab.chat_template
    config["clean_up_tokenization_spaces"] = False
    config["tokenizer_class"] = tokenizer_class
    return config


def _special_map(vocab: Vocab) -> dict:
    out = {}
    for name in SPECIAL_NAMES:
        tid = getattr(vocab, f"{name}_id")
        if tid is not None and tid < len(vocab):
            out[f"{name}_token"] = vocab.tokens[tid]
    return out


def _dump(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")

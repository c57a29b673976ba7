"""Read an HF tokenizer folder into a :class:`Vocab`.

Three shapes of folder are understood, in this order of preference:

1. ``tokenizer.model`` (SentencePiece): pieces, scores and types straight from the proto, which is
   kept whole in ``Vocab.spm_proto``. Added tokens are layered on top the way llama.cpp's converter
   does it (``_create_vocab_sentencepiece`` in convert_hf_to_gguf): entries of
   ``added_tokens.json`` and ``tokenizer_config.json["added_tokens_decoder"]`` re-type ids inside the
   SentencePiece range to USER_DEFINED / CONTROL with score -1000 and extend the vocabulary past
   it; ``tokenizer.json["added_tokens"]`` only extends it (llama.cpp ignores that file here).
2. ``tokenizer.json`` with a byte-level BPE model: model ``gpt2`` with merges, and the llama.cpp
   pre-tokenizer name read off the pre-tokenizer definition (see :func:`detect_pre`).
3. ``tokenizer.json`` with a SentencePiece-style BPE model (Metaspace ``▁``, byte fallback): what
   mergekit and ``save_pretrained`` leave when ``tokenizer.model`` is not copied. It is read back as
   a ``llama`` vocabulary whose scores are rebuilt from the merge ranks, so a ``tokenizer.model``
   written from it ranks merges exactly as the original did (llama.cpp's own fallback gives every
   piece -1000 and tokenizes differently).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..errors import GGMergeError
from . import spm_proto
from .spm_proto import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED
from .vocab import Vocab

log = logging.getLogger(__name__)

#: score llama.cpp's converter gives added tokens (and that HF files therefore imply)
ADDED_SCORE = -1000.0
SPECIAL_NAMES = ("bos", "eos", "unk", "pad")

# The published pre-tokenizer regexes of the Llama-3 and Qwen2 tokenizer.json files.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


#: llama.cpp pre-tokenizer name → the tokenizer.json ``pre_tokenizer`` that splits text the same way
#: (llama.cpp src/llama-vocab.cpp, llm_tokenizer_bpe: the regex list chosen per pre type).
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt-2": _byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), _byte_level(False)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), _byte_level(False)]},
}
PRE_TOKENIZERS["starcoder"] = PRE_TOKENIZERS["smollm"]
#: pre types whose BPE model ignores merges for whole-word vocabulary hits (llama-vocab.cpp)
IGNORE_MERGES = {"llama-bpe"}


def read_hf(folder: str | os.PathLike) -> Vocab:
    """The vocabulary, special ids, add_bos/eos flags and chat template of an HF tokenizer folder."""
    folder = Path(folder)
    cfg = _json(folder / "tokenizer_config.json") or {}
    tj = _json(folder / "tokenizer.json")
    if (folder / "tokenizer.model").is_file():
        vocab = _read_spm(folder, cfg, tj)
    elif tj is not None:
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise GGMergeError(f"tokenizer model type {model.get('type')!r} is not supported "
                               "(only BPE, or a tokenizer.model)", path=folder / "tokenizer.json",
                               key="model.type")
        vocab = (_read_bpe(folder, tj, cfg) if _is_byte_level(tj)
                 else _read_spm_json(folder, tj, cfg))
    else:
        raise GGMergeError("no tokenizer.model or tokenizer.json in this folder", path=folder)
    _set_specials(vocab, folder, cfg)
    _set_add_flags(vocab, cfg, tj)
    vocab.chat_template = _chat_template(folder, cfg)
    return vocab


# ---------------------------------------------------------------------------------- SentencePiece

def _read_spm(folder: Path, cfg: dict, tj: dict | None) -> Vocab:
    path = folder / "tokenizer.model"
    data = path.read_bytes()
    proto = spm_proto.parse(data, path=path)
    tokens, scores, types = spm_proto.pieces(proto)
    n_spm = len(tokens)

    def put(tid: int, content: str, typ: int, source: Path) -> None:
        if tid < 0:
            raise GGMergeError(f"negative token id {tid} for {content!r}", path=source)
        while len(tokens) <= tid:  # gaps between added ids: llama.cpp's [PADn] placeholders
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(ADDED_SCORE)
            types.append(UNUSED)
        if tid < n_spm and tokens[tid] != content:
            log.warning("%s: token %d %r is replaced by %r", source, tid, tokens[tid], content)
        tokens[tid], scores[tid], types[tid] = content, ADDED_SCORE, typ

    added_json = _json(folder / "added_tokens.json") or {}
    for content, tid in sorted(added_json.items(), key=lambda kv: kv[1]):
        put(int(tid), content, USER_DEFINED, folder / "added_tokens.json")
    for tid, entry in sorted(((int(k), v) for k, v in (cfg.get("added_tokens_decoder") or {}).items())):
        content = entry["content"]
        special = bool(entry.get("special")) or looks_special(content)
        put(tid, content, CONTROL if special else USER_DEFINED, folder / "tokenizer_config.json")
    if tj is not None:
        known = len(tokens)
        for entry in sorted(tj.get("added_tokens") or [], key=lambda e: e["id"]):
            if entry["id"] >= known:
                special = bool(entry.get("special")) or looks_special(entry["content"])
                put(entry["id"], entry["content"], CONTROL if special else USER_DEFINED,
                    folder / "tokenizer.json")
    ts = proto.trainer_spec
    return Vocab(model="llama", tokens=tokens, scores=scores, types=types,
                 unk_id=_proto_id(ts.unk_id), bos_id=_proto_id(ts.bos_id),
                 eos_id=_proto_id(ts.eos_id), pad_id=_proto_id(ts.pad_id),
                 add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix), spm_proto=data)


def _proto_id(tid: int) -> int | None:
    return tid if tid >= 0 else None


def _read_spm_json(folder: Path, tj: dict, cfg: dict) -> Vocab:
    """A SentencePiece-style BPE tokenizer.json → ``llama`` vocabulary with rank-derived scores.

    SentencePiece BPE (and llama.cpp's ``llama`` tokenizer) merges the adjacent pair whose joined
    piece has the highest score; HF's BPE applies its merge list in order. Giving each piece
    ``-rank`` of the first merge that produces it makes the two orders the same. Pieces no merge
    produces (single characters, bytes, specials) are never the result of a pair, so their score
    never decides anything; they get scores below every merged piece, in id order.
    """
    path = folder / "tokenizer.json"
    model = tj["model"]
    tokens, types = _id_table(path, model.get("vocab") or {}, tj.get("added_tokens") or [])
    merges = _merges(path, model.get("merges") or [])
    score: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        score.setdefault(left + right, -float(rank))
    if model.get("byte_fallback"):
        for i, t in enumerate(tokens):
            if types[i] == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = BYTE
    floor = -float(len(merges))
    scores = [score.get(t, floor - i) if types[i] == NORMAL else 0.0 for i, t in enumerate(tokens)]
    unk = model.get("unk_token")
    if unk is not None and unk in tokens:
        types[tokens.index(unk)] = UNKNOWN
    log.info("%s: no tokenizer.model; rebuilt SentencePiece scores from %d merge ranks", path, len(merges))
    return Vocab(model="llama", tokens=tokens, scores=scores, types=types,
                 add_space_prefix=_metaspace_prefix(tj))


def _metaspace_prefix(tj: dict) -> bool:
    for step in _steps(tj.get("pre_tokenizer")) + _steps(tj.get("normalizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
    return False


# ---------------------------------------------------------------------------------- byte-level BPE

def _read_bpe(folder: Path, tj: dict, cfg: dict) -> Vocab:
    path = folder / "tokenizer.json"
    model = tj["model"]
    tokens, types = _id_table(path, model.get("vocab") or {}, tj.get("added_tokens") or [])
    byte_level = [s for s in _steps(tj.get("pre_tokenizer")) if s.get("type") == "ByteLevel"]
    return Vocab(model="gpt2", tokens=tokens, scores=[0.0] * len(tokens), types=types,
                 merges=_merges(path, model.get("merges") or []), pre=detect_pre(tj, cfg, path),
                 add_space_prefix=bool(byte_level and byte_level[0].get("add_prefix_space")))


def detect_pre(tj: dict, cfg: dict, path: Path | None = None) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json.

    llama.cpp's converter (``get_vocab_base_pre``) hashes the token ids of a fixed text and looks
    the hash up in a table of known checkpoints. Ids change whenever a vocabulary does (an added
    token, a union tokenizer), so that hash cannot recognise a merged model's tokenizer. What
    llama.cpp actually implements per name is a list of split regexes; we compare the
    pre-tokenizer definition itself with the definition each supported name stands for
    (:data:`PRE_TOKENIZERS`). SmolLM and StarCoder split identically and differ only in
    detokenization (``clean_up_tokenization_spaces``), which picks between them. Any other definition
    is refused (a GGMergeError naming the file), as llama.cpp's converter refuses it.
    """
    sig = _signature(tj.get("pre_tokenizer"))
    for name, pre in PRE_TOKENIZERS.items():
        if name != "starcoder" and _signature(pre) == sig:
            if name == "smollm" and cfg.get("clean_up_tokenization_spaces", False):
                return "starcoder"
            return name
    # llama.cpp's converter stops here too (get_vocab_base_pre: "BPE pre-tokenizer was not
    # recognized"), and llama.cpp itself refuses a name it does not know (llama_vocab::impl::load):
    # 'default' would load but split text differently from the model's own tokenizer
    raise GGMergeError(
        "byte-level BPE pre-tokenizer is not one llama.cpp is known to implement the same way "
        f"(known: {', '.join(PRE_TOKENIZERS)}); its definition: {json.dumps(tj.get('pre_tokenizer'))[:200]}",
        path=path, key="pre_tokenizer")


def _signature(pre: dict | None) -> list[tuple]:
    out: list[tuple] = []
    for s in _steps(pre):
        t = s.get("type")
        if t == "ByteLevel":
            out.append((t, bool(s.get("use_regex", True))))
        elif t == "Digits":
            out.append((t, bool(s.get("individual_digits", False))))
        elif t == "Split":
            pat = s.get("pattern") or {}
            out.append((t, pat.get("Regex", pat.get("String")), s.get("behavior"), bool(s.get("invert"))))
        else:
            out.append((t, json.dumps(s, sort_keys=True)))
    return out


def _is_byte_level(tj: dict) -> bool:
    return any(s.get("type") == "ByteLevel"
               for s in _steps(tj.get("pre_tokenizer")) + _steps(tj.get("decoder")))


# ---------------------------------------------------------------------------------- shared parts

def looks_special(token: str) -> bool:
    """Added tokens some models forget to flag as special (llama.cpp: ``does_token_look_special``)."""
    return (token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>")))


def _id_table(path: Path, vocab: dict[str, int], added: list[dict]) -> tuple[list[str], list[int]]:
    """tokens and types by id from a tokenizer.json vocab plus its added tokens; holes → [PADn]."""
    by_id: dict[int, tuple[str, int]] = {int(i): (t, NORMAL) for t, i in vocab.items()}
    for e in added:
        special = bool(e.get("special")) or looks_special(e["content"])
        by_id[int(e["id"])] = (e["content"], CONTROL if special else USER_DEFINED)
    if not by_id:
        raise GGMergeError("empty vocabulary", path=path, key="model.vocab")
    n = max(by_id) + 1
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED))[0] for i in range(n)]
    types = [by_id.get(i, ("", UNUSED))[1] for i in range(n)]
    return tokens, types


def _merges(path: Path, merges: list) -> list[str]:
    """Merges as llama.cpp stores them: "left right" (a space inside a part would be ambiguous)."""
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2:
            if " " in m[0] or " " in m[1]:
                raise GGMergeError(f"merge {m!r} has a space inside a part", path=path, key="model.merges")
            out.append(f"{m[0]} {m[1]}")
        else:
            raise GGMergeError(f"unexpected merge entry {m!r}", path=path, key="model.merges")
    return out


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
        return [s for n in inner for s in _steps(n)]
    return [node]


def _content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _set_specials(vocab: Vocab, folder: Path, cfg: dict) -> None:
    """bos/eos/unk/pad by token string (tokenizer_config, then special_tokens_map), else config.json ids."""
    stm = _json(folder / "special_tokens_map.json") or {}
    model_cfg = _json(folder / "config.json") or {}
    index = vocab.index()
    for name in SPECIAL_NAMES:
        key = f"{name}_token"
        if key in cfg and cfg[key] is None:
            setattr(vocab, f"{name}_id", None)  # explicitly unset (e.g. pad_token: null)
            continue
        text = _content(cfg[key]) if key in cfg else _content(stm.get(key))
        if text is not None:
            if text in index:
                setattr(vocab, f"{name}_id", index[text])
                continue
            log.warning("%s: %s %r is not in the vocabulary", folder, key, text)
        tid = model_cfg.get(f"{name}_token_id")
        if isinstance(tid, int) and 0 <= tid < len(vocab):
            setattr(vocab, f"{name}_id", tid)


def _set_add_flags(vocab: Vocab, cfg: dict, tj: dict | None) -> None:
    # defaults: LlamaTokenizer adds BOS; a byte-level BPE adds what its post-processor adds
    add_bos, add_eos = (True, False) if vocab.model == "llama" else _post_processor_flags(vocab, tj)
    vocab.add_bos = cfg["add_bos_token"] if isinstance(cfg.get("add_bos_token"), bool) else add_bos
    vocab.add_eos = cfg["add_eos_token"] if isinstance(cfg.get("add_eos_token"), bool) else add_eos
    sep = _post_processor_sep(tj, cfg)
    vocab.add_sep = sep if sep is not None else (cfg["add_sep_token"] if isinstance(cfg.get("add_sep_token"), bool)
                                                 else None)


def _post_processor_sep(tj: dict | None, cfg: dict) -> bool | None:
    """``add_sep_token`` as gguf-py's ``SpecialVocab._try_load_from_tokenizer_json`` derives it from a
    tokenizer.json post-processor, or None where it derives nothing (then tokenizer_config decides).

    RobertaProcessing adds a separator. For TemplateProcessing, the ``pair`` template without the
    leading/trailing specials that ``single`` also has must be ``$A … $B``; if something stands between
    them, a separator is added when it is the sep or eos token (the first of two only when ``single``
    has no trailing special) — else not (Llama's ``<s> $A <s> $B``: False)."""
    if not tj:
        return None
    # compared as SpecialVocab compares them: the raw tokenizer_config values (a dict never matches)
    sep_tok, eos_tok = cfg.get("sep_token"), cfg.get("eos_token")
    out = None
    pp = tj.get("post_processor") or {}
    for proc in pp.get("processors", [pp]):
        kind = proc.get("type")
        if kind == "RobertaProcessing":
            out = True
        elif kind == "TemplateProcessing":
            single, pair = proc.get("single") or [], proc.get("pair") or []

            def special(entry):
                return entry.get("SpecialToken", {}).get("id")

            first = special(single[0]) if len(single) > 1 else None
            last = special(single[-1]) if len(single) > 1 else None
            if not pair:
                continue
            start = 1 if first and special(pair[0]) == first else 0
            stop = -1 if last and special(pair[-1]) == last else None
            middle = pair[start:stop]
            if not middle:
                continue
            a, b = middle[0].get("Sequence", {}).get("id"), middle[-1].get("Sequence", {}).get("id")
            middle = middle[1:-1]
            if a == "A" and b == "B" and middle:
                add = special(middle[0]) in (sep_tok, eos_tok) and not last if special(middle[0]) else False
                if len(middle) == 2 and special(middle[1]) in (sep_tok, eos_tok):
                    add = True
                out = bool(add)
    return out


def _post_processor_flags(vocab: Vocab, tj: dict | None) -> tuple[bool, bool]:
    """What gguf-py's SpecialVocab reads from a TemplateProcessing ``single`` template."""
    pp = (tj or {}).get("post_processor") or {}
    for proc in pp.get("processors", [pp]):
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            return first is not None, last is not None
    return False, False


def _chat_template(folder: Path, cfg: dict) -> str | None:
    tmpl = cfg.get("chat_template")
    if tmpl is None:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        tmpl = (_json(folder / "chat_template.json") or {}).get("chat_template")
    if isinstance(tmpl, list):  # named templates: the default one is the chat template
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    if tmpl is not None and not isinstance(tmpl, str):
        raise GGMergeError("chat_template must be a string", path=folder / "tokenizer_config.json",
                           key="chat_template")
    return tmpl


#: parsed large JSON files by the SHA-256 of their bytes (a merge's inputs usually share one tokenizer:
#: eight copies of a 2 MB tokenizer.json are parsed once). The values are only read, never changed.
_PARSED: "OrderedDict[bytes, Any]" = OrderedDict()
_PARSED_MIN, _PARSED_KEEP = 1 << 16, 4


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
        key = hashlib.sha256(data).digest() if len(data) >= _PARSED_MIN else None
        if key is not None and key in _PARSED:
            _PARSED.move_to_end(key)
            return _PARSED[key]
        value = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GGMergeError(f"not valid JSON: {exc}", path=path) from None
    if key is not None:
        _PARSED[key] = value
        while len(_PARSED) > _PARSED_KEEP:
            _PARSED.popitem(last=False)
    return value

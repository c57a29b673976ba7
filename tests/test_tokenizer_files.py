"""HF tokenizer folders ↔ Vocab (hf_vocab.read_hf, hf_files.write_hf, spm_proto.build).

References: the real Mistral v1/v3 SentencePiece models (mistral-common), ``sentencepiece`` itself,
transformers' AutoTokenizer, and llama.cpp (llama-cpp-python) tokenizing the real SmolLM2 GGUF and
vocab-only GGUFs written from our Vocab.
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import gguf
import pytest
import sentencepiece as spm

from ggmerge.errors import GGMergeError
from ggmerge.tokenizer import spm_proto
from ggmerge.tokenizer.gguf_vocab import read_gguf, write_vocab
from ggmerge.tokenizer.hf_files import write_hf
from ggmerge.tokenizer.hf_vocab import read_hf
from ggmerge.tokenizer.vocab import Vocab
from models import SEED_PROMPT_TURN1, SEED_PROMPT_TURN2, spm_v1_path, spm_v3_path, write_tokenizer_dir

CONTROL, USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
#: whitespace runs, digits, punctuation, bytes outside the vocabulary (byte fallback)
MIXED = "Hello  world,\n\n  12345 67.8 ☃ 🦙 café ― 日本語のテキスト\tend"
TEXTS = [SEED_PROMPT_TURN1, SEED_PROMPT_TURN2.split("</s>")[1], MIXED]


def _auto(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def vocab_gguf(vocab: Vocab, path) -> None:
    """A vocab-only llama GGUF (tokenizer metadata through gguf_vocab.write_vocab, no tensors)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    write_vocab(w, vocab, len(vocab))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_vocab(path):
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory):
    return write_tokenizer_dir(tmp_path_factory.mktemp("v1"), spm_v1_path())


@pytest.fixture(scope="module")
def sp_v1():
    return spm.SentencePieceProcessor(model_file=str(spm_v1_path()))


# ---------------------------------------------------------------------------------- SentencePiece

def test_read_spm_matches_sentencepiece(v1_dir, sp_v1):
    v = read_hf(v1_dir)
    assert v.model == "llama" and len(v) == sp_v1.vocab_size() == 32000
    assert v.tokens == [sp_v1.id_to_piece(i) for i in range(32000)]
    assert v.scores == [sp_v1.get_score(i) for i in range(32000)]
    expect = [2 if sp_v1.is_unknown(i) else 3 if sp_v1.is_control(i) else 6 if sp_v1.is_byte(i) else 1
              for i in range(32000)]
    assert v.types == expect
    assert v.spm_proto == spm_v1_path().read_bytes()
    assert (v.unk_id, v.bos_id, v.eos_id, v.pad_id) == (0, 1, 2, None)
    assert (v.add_bos, v.add_eos, v.add_space_prefix) == (True, False, True)


@pytest.mark.parametrize("gap", [False, True])
def test_added_tokens_like_llama_cpp_converter(tmp_path, gap):
    """added_tokens_decoder re-types ids inside the SentencePiece model (score -1000) and extends it
    (convert_hf_to_gguf's rule); the written folder reads back equal, and transformers on it
    tokenizes like llama.cpp on the vocabulary. With a hole between added ids (gap) the holes
    become [PADn] pieces of a rebuilt tokenizer.model, since transformers numbers added tokens
    consecutively."""
    d = write_tokenizer_dir(tmp_path / "in", spm_v1_path())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    entry = {"lstrip": False, "rstrip": False, "single_word": False, "normalized": False}
    extra_id = 32002 if gap else 32001
    cfg["added_tokens_decoder"] = {
        "0": {"content": "<unk>", "special": True, **entry},
        "1": {"content": "<s>", "special": True, **entry},
        "2": {"content": "</s>", "special": True, **entry},
        "32000": {"content": "<|im_start|>", "special": False, **entry},  # looks special → control
        str(extra_id): {"content": "<extra>", "special": False, **entry},
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    v = read_hf(d)
    assert len(v) == extra_id + 1
    assert v.types[:3] == [CONTROL] * 3 and v.scores[:3] == [-1000.0] * 3
    assert v.tokens[32000] == "<|im_start|>" and v.types[32000] == CONTROL
    assert v.tokens[extra_id] == "<extra>" and v.types[extra_id] == USER_DEFINED
    if gap:
        assert (v.tokens[32001], v.types[32001]) == ("[PAD32001]", int(gguf.TokenType.UNUSED))
    assert v.types[3:32000] == read_hf(write_tokenizer_dir(tmp_path / "plain", spm_v1_path())).types[3:32000]

    out = tmp_path / "out"
    write_hf(v, out)
    assert ((out / "tokenizer.model").read_bytes() == spm_v1_path().read_bytes()) is not gap
    back = read_hf(out)
    assert dataclasses.replace(back, spm_proto=None) == dataclasses.replace(v, spm_proto=None)
    assert back == v or gap
    write_hf(back, tmp_path / "again")
    assert read_hf(tmp_path / "again") == back
    text = "<|im_start|>user\n" + SEED_PROMPT_TURN1 + " <extra>x"
    hf_ids = _auto(out)(text)["input_ids"]
    vocab_gguf(v, tmp_path / "v.gguf")
    assert llama_vocab(tmp_path / "v.gguf").tokenize(text.encode(), add_bos=True, special=True) == hf_ids
    assert hf_ids[:2] == [1, 32000] and extra_id in hf_ids


@pytest.mark.parametrize("which", ["v1", "v3"])
def test_spm_round_trip_and_autotokenizer(tmp_path, which):
    src = spm_v1_path() if which == "v1" else spm_v3_path()
    d = write_tokenizer_dir(tmp_path / "in", src, chat_template="{{ messages[0]['content'] }}")
    v = read_hf(d)
    out = tmp_path / "out"
    write_hf(v, out)
    assert sorted(p.name for p in out.iterdir()) == ["special_tokens_map.json", "tokenizer.model",
                                                     "tokenizer_config.json"]
    assert (out / "tokenizer.model").read_bytes() == src.read_bytes()
    back = read_hf(out)
    assert back == v
    sp = spm.SentencePieceProcessor(model_file=str(src))
    tok = _auto(out)
    for text in TEXTS[:2]:
        assert tok(text)["input_ids"] == [v.bos_id] + sp.encode(text)
    # with '</s>' inside the text (the seed's turn 2), transformers on our files = llama.cpp
    vocab_gguf(v, tmp_path / "v.gguf")
    llama = llama_vocab(tmp_path / "v.gguf")
    for text in (SEED_PROMPT_TURN1, SEED_PROMPT_TURN2, "a</s>b\n</s>c"):
        assert tok(text)["input_ids"] == llama.tokenize(text.encode(), add_bos=True, special=True)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    if which == "v3":  # control pieces stay special for transformers
        assert tok("[INST]", add_special_tokens=False)["input_ids"] == [3]


def test_build_from_gguf_vocab_tokenizes_like_original(tmp_path, sp_v1, v1_dir):
    """A llama vocabulary without a proto (as read back from a GGUF) gets a tokenizer.model with
    Mistral's settings; sentencepiece and llama.cpp then agree with the original model."""
    vocab_gguf(read_hf(v1_dir), tmp_path / "v1.gguf")
    g = read_gguf(gguf.GGUFReader(tmp_path / "v1.gguf"))
    assert g.spm_proto is None
    data = spm_proto.build(g)
    rebuilt = spm.SentencePieceProcessor(model_proto=data)
    llama = llama_vocab(tmp_path / "v1.gguf")
    for text in TEXTS:
        assert rebuilt.encode(text) == sp_v1.encode(text)
        assert llama.tokenize(text.encode(), add_bos=False, special=False) == sp_v1.encode(text)
    proto, orig = spm_proto.parse(data), spm_proto.parse(spm_v1_path().read_bytes())
    assert proto.normalizer_spec == orig.normalizer_spec
    for f in ("model_type", "byte_fallback", "unk_id", "bos_id", "eos_id", "pad_id", "split_digits"):
        assert getattr(proto.trainer_spec, f) == getattr(orig.trainer_spec, f), f
    write_hf(g, tmp_path / "hf")
    assert _auto(tmp_path / "hf")(SEED_PROMPT_TURN1)["input_ids"] == [1] + sp_v1.encode(SEED_PROMPT_TURN1)


def test_spm_style_tokenizer_json_gets_scores_from_merge_ranks(tmp_path, v1_dir, sp_v1):
    """A folder with only tokenizer.json (what mergekit / save_pretrained leave): the rebuilt
    tokenizer.model merges in the tokenizer.json's order, so sentencepiece = transformers."""
    tok = _auto(v1_dir)
    tok.save_pretrained(tmp_path / "mk")
    assert not (tmp_path / "mk" / "tokenizer.model").exists()
    v = read_hf(tmp_path / "mk")
    assert v.model == "llama" and v.tokens == read_hf(v1_dir).tokens
    assert (v.bos_id, v.eos_id, v.unk_id) == (1, 2, 0)
    write_hf(v, tmp_path / "out")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    for text in TEXTS:
        assert sp.encode(text) == tok(text, add_special_tokens=False)["input_ids"]
    assert sp.encode(SEED_PROMPT_TURN1) == sp_v1.encode(SEED_PROMPT_TURN1)


# ---------------------------------------------------------------------------------- byte-level BPE

def _smollm2_vocab() -> Vocab:
    path = _smollm2_path()
    r = gguf.GGUFReader(path)
    return read_gguf(r)


def _smollm2_path():
    from models import smollm2_path

    return str(smollm2_path())


def test_smollm2_bpe_written_tokenizes_like_llama_cpp(tmp_path):
    """The real SmolLM2 vocabulary written as tokenizer.json: transformers on it = llama.cpp on the
    real GGUF, and read_hf recovers the vocabulary (pre-tokenizer 'smollm' detected from its definition)."""
    v = _smollm2_vocab()
    assert v.model == "gpt2" and v.pre == "smollm"
    write_hf(v, tmp_path / "hf")
    back = read_hf(tmp_path / "hf")
    assert back.tokens == v.tokens and back.merges == v.merges and back.types == v.types
    assert (back.pre, back.bos_id, back.eos_id, back.unk_id, back.pad_id, back.add_bos) == \
        (v.pre, v.bos_id, v.eos_id, v.unk_id, v.pad_id, v.add_bos)
    assert back.chat_template == v.chat_template
    tok = _auto(tmp_path / "hf")
    llama = llama_vocab(_smollm2_path())
    for text in TEXTS + [SEED_PROMPT_TURN2, "<|im_start|>user\nhi 2024<|im_end|>\n"]:
        assert tok(text)["input_ids"] == llama.tokenize(text.encode(), add_bos=False, special=True)
    write_hf(back, tmp_path / "again")
    assert read_hf(tmp_path / "again") == back


def test_bpe_tokenizer_json_built_with_tokenizers(tmp_path):
    """A byte-level BPE trained by the tokenizers library: read_hf gives gpt2 + merges + pre name."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([SEED_PROMPT_TURN2, MIXED] * 3, trainer)
    d = tmp_path / "bpe"
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "clean_up_tokenization_spaces": False}))
    v = read_hf(d)
    tj = json.loads((d / "tokenizer.json").read_text())
    assert v.model == "gpt2" and v.pre == "smollm" and len(v) == tk.get_vocab_size()
    assert v.merges == [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    assert v.types[:2] == [CONTROL, CONTROL] and (v.bos_id, v.eos_id) == (0, 0)
    assert v.add_bos is False
    write_hf(v, tmp_path / "out")
    assert read_hf(tmp_path / "out") == v
    tok = _auto(tmp_path / "out")
    for text in TEXTS:
        assert tok(text)["input_ids"] == tk.encode(text).ids


# ---------------------------------------------------------------------------------- misc

def test_chat_template_sources(tmp_path):
    d = write_tokenizer_dir(tmp_path / "a", spm_v1_path())
    (d / "chat_template.jinja").write_text("{{ 'J' }}")
    assert read_hf(d).chat_template == "{{ 'J' }}"
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "{{ 'D' }}"}, {"name": "tool_use", "template": "x"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    v = read_hf(d)
    assert v.chat_template == "{{ 'D' }}"
    write_hf(v, d)  # over the same folder: the stale .jinja goes, tokenizer_config carries it
    assert not (d / "chat_template.jinja").exists()
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == "{{ 'D' }}"


def test_errors_name_the_file(tmp_path):
    d = write_tokenizer_dir(tmp_path / "bad", spm_v1_path())
    (d / "tokenizer.model").write_bytes(b"\x0a\xff\xff garbage")
    with pytest.raises(GGMergeError) as e:
        read_hf(d)
    assert e.value.path == d / "tokenizer.model"
    (d / "tokenizer.model").write_bytes(b"")
    with pytest.raises(GGMergeError, match="SentencePiece"):
        read_hf(d)
    shutil.copyfile(spm_v1_path(), d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(GGMergeError) as e:
        read_hf(d)
    assert e.value.path == d / "tokenizer_config.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GGMergeError) as e:
        read_hf(empty)
    assert e.value.path == empty


def test_piece_type_numbers_are_gguf_token_types():
    """spm_proto spells the shared numbering as literals (so a build need not import gguf-py)."""
    assert (spm_proto.NORMAL, spm_proto.UNKNOWN, spm_proto.CONTROL, spm_proto.USER_DEFINED, spm_proto.UNUSED,
            spm_proto.BYTE) == tuple(int(t) for t in (gguf.TokenType.NORMAL, gguf.TokenType.UNKNOWN,
                                                      gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
                                                      gguf.TokenType.UNUSED, gguf.TokenType.BYTE))

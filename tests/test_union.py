"""The union tokenizer and embedding-row remapping (mergekit semantics) on real vocabularies.

Real material: Mistral v1 (32000) and v3 (32768; the same 31,741 normal pieces shifted by 768
behind control tokens) from mistral-common; sentencepiece's Japanese Unigram test model (8000
pieces, NFKC) when the sentencepiece sdist is unpacked under /work/ref (or GGMERGE_SPM_TESTDATA).
Consumers checked: sentencepiece, transformers AutoTokenizer, llama.cpp (llama-cpp-python).
The fill rule is checked against a transcription of mergekit's ``PermutedVocabulary`` loop.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from ggmerge.errors import GGMergeError
from ggmerge.tokenizer.hf_files import write_hf
from ggmerge.tokenizer.hf_vocab import read_hf
from ggmerge.tokenizer.union import remap_rows, union_vocab, vocab_from_donor
from models import SEED_PROMPT_TURN1, SEED_PROMPT_TURN2, spm_v1_path, spm_v3_path, write_tokenizer_dir
from test_tokenizer_files import _auto, llama_vocab, vocab_gguf

CONTROL, USER_DEFINED, NORMAL = 3, 4, 1


def _ja_model() -> Path | None:
    roots = [os.environ.get("GGMERGE_SPM_TESTDATA", "")] + glob.glob("/work/ref/sentencepiece-*/test")
    for root in filter(None, roots):
        for name in ("kyoto_ja_unigram_8000.model", "test_ja_model.model"):
            if (Path(root) / name).is_file():
                return Path(root) / name
    return None


JA = _ja_model()
needs_ja = pytest.mark.skipif(JA is None, reason="sentencepiece sdist test/ folder not found "
                              "(set GGMERGE_SPM_TESTDATA to it)")


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocabs")
    out = {"v1": read_hf(write_tokenizer_dir(root / "v1", spm_v1_path())),
           "v3": read_hf(write_tokenizer_dir(root / "v3", spm_v3_path()))}
    if JA is not None:
        out["ja"] = read_hf(write_tokenizer_dir(root / "ja", JA))
    return out


def rows_encoding_ids(model: int, n: int, width: int = 4) -> torch.Tensor:
    """Row i of model m is [m, i, m*1e5 + i, ...]: every value says where it came from."""
    ids = torch.arange(n, dtype=torch.float32)
    cols = [torch.full((n,), float(model)), ids, model * 1e5 + ids]
    return torch.stack(cols + [ids * 0 + 7] * (width - 3), dim=1)


def mergekit_reference(rows, maps, base):
    """mergekit/tokenizer/embed.py PermutedVocabulary.execute, per token, in plain Python."""
    n = len(maps[0])
    models = range(len(rows))
    fill = {}
    for j in range(n):
        has = [m for m in models if maps[m][j] >= 0]
        if len(has) == len(rows):
            continue
        if len(has) == 1:
            fill[j] = rows[has[0]][maps[has[0]][j]]
        elif not has:
            fill[j] = torch.zeros(rows[0].shape[1:])
        elif base is not None and maps[base][j] >= 0:
            fill[j] = rows[base][maps[base][j]]
        else:
            e = torch.zeros(rows[0].shape[1:])
            for m in has:
                e = e + rows[m][maps[m][j]]
            fill[j] = e / len(has)
    out = []
    for m in models:
        new = torch.zeros((n, *rows[0].shape[1:]))
        for j in range(n):
            new[j] = rows[m][maps[m][j]] if maps[m][j] >= 0 else fill[j]
        out.append(new)
    return out


# ---------------------------------------------------------------------------------- Mistral v1 ∪ v3

def test_v1_v3_union_sizes_and_maps(vocabs):
    v1, v3 = vocabs["v1"], vocabs["v3"]
    u, maps = union_vocab([v1, v3], base=0)
    assert len(u) == 32768 and u.tokens[:32000] == v1.tokens
    assert np.array_equal(maps[0][:32000], np.arange(32000)) and (maps[0][32000:] == -1).all()
    # shared normal pieces: identical scores, v3 shifted by 768; bytes likewise; specials kept
    normal = [i for i in range(32000) if v1.types[i] == NORMAL]
    assert len(normal) == 31741
    assert np.array_equal(maps[1][normal], np.array(normal) + 768)
    assert [v3.scores[maps[1][i]] for i in normal] == [v1.scores[i] for i in normal]
    assert np.array_equal(maps[1][3:259], np.arange(771, 1027))
    assert list(maps[1][:3]) == [0, 1, 2]
    # the 768 new tokens: v3's ids 3..770 in order, with their own types
    assert np.array_equal(maps[1][32000:], np.arange(3, 771))
    assert u.tokens[32000:] == v3.tokens[3:771] and u.types[32000:] == v3.types[3:771]
    assert u.types[32000:].count(CONTROL) == 748 and u.types[32000:].count(USER_DEFINED) == 20
    assert (u.bos_id, u.eos_id, u.unk_id, u.add_bos) == (v1.bos_id, v1.eos_id, v1.unk_id, v1.add_bos)


def test_rows_come_from_the_right_source_rows(vocabs):
    u, maps = union_vocab([vocabs["v1"], vocabs["v3"]], base=0)
    rows = [rows_encoding_ids(0, 32000), rows_encoding_ids(1, 32768)]
    out = remap_rows(rows, maps, base=0)
    assert [tuple(t.shape) for t in out] == [(32768, 4), (32768, 4)]
    for m in (0, 1):
        own = maps[m] >= 0
        assert torch.equal(out[m][torch.from_numpy(own)][:, :2],
                           torch.stack([torch.full((int(own.sum()),), float(m)),
                                        torch.from_numpy(maps[m][own]).float()], dim=1))
    # tokens v1 lacks exist only in v3: model 0 gets v3's rows (single donor)
    assert torch.equal(out[0][32000:], rows[1][3:771])
    assert torch.equal(out[0][:32000], rows[0])


@pytest.mark.parametrize("order,base", [(("v1", "v3", "v3"), 0),    # mean of two donors
                                        (("v3", "v3", "v1"), 0),    # base has it: base's row
                                        (("v3", "v1", "v3"), None),  # no base: mean
                                        (("v1", "v3"), 1)])
def test_fill_rule_equals_mergekit(vocabs, order, base):
    vs = [vocabs[k] for k in order]
    u, maps = union_vocab(vs, base=base if base is not None else 0)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(len(v), 8, generator=gen) for v in vs]
    got = remap_rows(rows, maps, base=base)
    want = mergekit_reference(rows, maps, base)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_zero_row_padding_and_weights():
    maps = [np.array([0, 1, -1, -1]), np.array([1, -1, 0, -1]), np.array([-1, 0, 1, -1])]
    rows = [torch.tensor([[1.0], [2.0]]), torch.tensor([[10.0], [20.0]]), torch.tensor([[100.0], [200.0]])]
    out = remap_rows(rows, maps, base=None, pad_to_multiple_of=3)
    # id 0 lacks in model 2: models 0,1 have it (1, 20) → mean 10.5; id 1 lacks in model 1 → (2+100)/2;
    # id 2 lacks in model 0 → (10+200)/2; id 3 in none → 0; padding rows: each model's mean row
    exp = [[1.0, 2.0, 105.0, 0.0], [20.0, 51.0, 10.0, 0.0], [10.5, 100.0, 200.0, 0.0]]
    for t, e in zip(out, exp):
        assert t.squeeze(1).tolist() == e + [sum(e) / 4] * 2
    w = remap_rows(rows, maps, base=None, weights=[1.0, 3.0, 1.0])
    assert w[2].squeeze(1).tolist()[0] == (1 * 1.0 + 3 * 20.0) / 4
    with pytest.raises(GGMergeError, match="points past"):
        remap_rows([rows[0][:1], rows[1], rows[2]], maps, base=0)


def test_merged_tokenizer_encodes_like_the_base(vocabs, tmp_path):
    """Written with write_hf: sentencepiece, AutoTokenizer and llama.cpp encode the seed's prompts
    on the union exactly as on the base; v3's user-defined pieces work where they appear."""
    v1, v3 = vocabs["v1"], vocabs["v3"]
    u, maps = union_vocab([v1, v3], base=0)
    write_hf(u, tmp_path / "u")
    assert read_hf(tmp_path / "u") == u
    sp_u = spm.SentencePieceProcessor(model_file=str(tmp_path / "u" / "tokenizer.model"))
    sp_1 = spm.SentencePieceProcessor(model_file=str(spm_v1_path()))
    assert sp_u.vocab_size() == 32768
    base_dir = write_tokenizer_dir(tmp_path / "v1", spm_v1_path())
    write_hf(v1, tmp_path / "v1w")
    tok_u, tok_1 = _auto(tmp_path / "u"), _auto(tmp_path / "v1w")
    vocab_gguf(u, tmp_path / "u.gguf")
    vocab_gguf(v1, tmp_path / "v1.gguf")
    ll_u, ll_1 = llama_vocab(tmp_path / "u.gguf"), llama_vocab(tmp_path / "v1.gguf")
    for text in (SEED_PROMPT_TURN1, SEED_PROMPT_TURN2):
        assert sp_u.encode(text) == sp_1.encode(text)
        assert tok_u(text)["input_ids"] == tok_1(text)["input_ids"]
        assert ll_u.tokenize(text.encode(), add_bos=True, special=True) == \
            ll_1.tokenize(text.encode(), add_bos=True, special=True) == tok_u(text)["input_ids"]
    assert tok_u(SEED_PROMPT_TURN1)["input_ids"] == _auto(base_dir)(SEED_PROMPT_TURN1)["input_ids"]
    doc0 = u.tokens.index("[REFERENCE_DOC_0]")
    assert maps[1][doc0] == v3.tokens.index("[REFERENCE_DOC_0]")
    assert doc0 in sp_u.encode("see [REFERENCE_DOC_0]")
    assert doc0 in tok_u("see [REFERENCE_DOC_0]")["input_ids"]
    assert doc0 in ll_u.tokenize(b"see [REFERENCE_DOC_0]", add_bos=False, special=False)
    assert tok_u("[INST]", add_special_tokens=False)["input_ids"] == [u.tokens.index("[INST]")]


def test_union_is_deterministic(vocabs, tmp_path):
    a, ma = union_vocab([vocabs["v3"], vocabs["v1"], vocabs["v3"]], base=1)
    b, mb = union_vocab([vocabs["v3"], vocabs["v1"], vocabs["v3"]], base=1)
    assert a == b and all(np.array_equal(x, y) for x, y in zip(ma, mb))
    write_hf(a, tmp_path / "a")
    write_hf(b, tmp_path / "b")
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_tokenizer_source_base_and_model(vocabs):
    v1, v3 = vocabs["v1"], vocabs["v3"]
    out, maps = vocab_from_donor(v1, [v1, v3])  # tokenizer_source: base (v1)
    assert out == v1 and out.tokens is not v1.tokens
    assert np.array_equal(maps[0], np.arange(32000)) and maps[1][500] == 500 + 768
    out, maps = vocab_from_donor(v3, [v1, v3])  # tokenizer_source: model:<v3>
    assert out == v3 and (maps[0][3:771] == -1).all() and maps[0][771] == 3
    assert np.array_equal(maps[1], np.arange(32768))
    rows = remap_rows([rows_encoding_ids(0, 32000), rows_encoding_ids(1, 32768)], maps, base=0)
    assert torch.equal(rows[0][3:771], rows_encoding_ids(1, 32768)[3:771])  # only v3 has them


def test_row_counts_drop_tokens_past_the_embedding(vocabs):
    """mergekit ignores tokenizer ids >= the model's vocab_size."""
    u, maps = union_vocab([vocabs["v1"], vocabs["v3"]], base=0, n_rows=[31990, None])
    assert len(u) == 31990 + 768 + 10 and (maps[0] < 31990).all()
    # v3 order: its 768 control/user-defined tokens, then the 10 pieces v1 lost, back from v3
    assert u.tokens[-10:] == vocabs["v1"].tokens[31990:32000]
    assert (maps[0][31990:] == -1).all() and np.array_equal(maps[1][-10:], np.arange(31990, 32000) + 768)


# ---------------------------------------------------------------------------------- a foreign vocabulary

@needs_ja
def test_union_with_japanese_unigram(vocabs, tmp_path):
    v1, ja = vocabs["v1"], vocabs["ja"]
    shared = set(v1.tokens) & set(ja.tokens)
    u, maps = union_vocab([v1, ja], base=0)
    assert len(u) == 32000 + 8000 - len(shared)
    assert (maps[1] >= 0).sum() == 8000 and (maps[0] >= 0).sum() == 32000
    again, maps2 = union_vocab([v1, ja], base=0)
    assert again == u and all(np.array_equal(x, y) for x, y in zip(maps, maps2))
    # new normal pieces rank below every base piece, in float32, strictly decreasing
    new = [s for s, t in zip(u.scores[32000:], u.types[32000:]) if t == NORMAL]
    assert max(new) < min(s for s, t in zip(v1.scores, v1.types) if t == NORMAL)
    assert all(a > b for a, b in zip(new, new[1:])) and all(np.float32(s) == s for s in new)
    write_hf(u, tmp_path / "u")
    assert read_hf(tmp_path / "u") == u
    # foreign normal pieces are reachable by merges, so Japanese text changes, but every consumer
    # of the merged files agrees on how
    sp_u = spm.SentencePieceProcessor(model_file=str(tmp_path / "u" / "tokenizer.model"))
    vocab_gguf(u, tmp_path / "u.gguf")
    ll = llama_vocab(tmp_path / "u.gguf")
    tok = _auto(tmp_path / "u")
    ids = sp_u.encode(SEED_PROMPT_TURN1)
    assert ll.tokenize(SEED_PROMPT_TURN1.encode(), add_bos=False, special=False) == ids
    assert tok(SEED_PROMPT_TURN1, add_special_tokens=False)["input_ids"] == ids
    # the Japanese model as base: its NFKC proto is kept and its own tokenization is unchanged
    u2, _ = union_vocab([ja, v1], base=0)
    assert len(u2) == len(u)
    write_hf(u2, tmp_path / "u2")
    sp_ja = spm.SentencePieceProcessor(model_file=str(JA))
    sp_u2 = spm.SentencePieceProcessor(model_file=str(tmp_path / "u2" / "tokenizer.model"))
    assert sp_u2.encode(SEED_PROMPT_TURN1) == sp_ja.encode(SEED_PROMPT_TURN1)
    assert sp_u2.encode("ｶﾀｶﾅ①") == sp_ja.encode("ｶﾀｶﾅ①")  # NFKC still applied
    rows = remap_rows([torch.randn(32000, 3), torch.randn(8000, 3)], maps, base=0)
    assert rows[0].shape == rows[1].shape == (len(u), 3)


# ---------------------------------------------------------------------------------- byte-level BPE

def _bpe(tmp_path, name, corpus, size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path / name
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    return read_hf(d)


def test_bpe_union_keeps_base_and_adds_donor_merges(tmp_path):
    base = _bpe(tmp_path, "a", [SEED_PROMPT_TURN1] * 3, 320)
    donor = _bpe(tmp_path, "b", ["zebras zebra zebrafish " * 20, SEED_PROMPT_TURN1], 300)
    u, maps = union_vocab([base, donor], base=0)
    assert u.model == "gpt2" and u.pre == "gpt-2" and u.tokens[:len(base)] == base.tokens
    assert u.merges[:len(base.merges)] == base.merges and len(u.merges) > len(base.merges)
    index = u.index()
    for m in u.merges:
        left, right = m.split(" ")
        assert left in index and right in index and left + right in index
    for j, t in enumerate(u.tokens):
        assert maps[1][j] == donor.index().get(t, -1)
    write_hf(u, tmp_path / "u")
    assert read_hf(tmp_path / "u") == u
    tok = _auto(tmp_path / "u")
    assert u.tokens[tok("zebra", add_special_tokens=False)["input_ids"][0]] == "zebra"

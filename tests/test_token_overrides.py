"""``tokenizer.tokens`` (mergekit's per-token embedding sources): rows by hand and against mergekit.

Two tiny models with real, different vocabularies: the base with Mistral v1 (32000), the other with v3
(32768: the same pieces behind 768 control tokens). With the v3 model as tokenizer source the base lacks
the control tokens, which is where mergekit's overrides apply (and everywhere with ``force``).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mergekit_ref
from ggmerge.build import build
from ggmerge.errors import GGMergeError
from ggmerge.tokenizer.hf_vocab import read_hf
from models import make_tiny_mistral, spm_v3_path


@pytest.fixture(scope="module")
def v1_v3(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    a = make_tiny_mistral(root / "a", seed=0, dtype=torch.float32, layers=1)
    b = make_tiny_mistral(root / "b", seed=1, dtype=torch.float32, layers=1, vocab=32768, spm_path=spm_v3_path())
    return a, b


def recipe(tmp_path, a, b, tokens: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(f"""merge_method: linear
dtype: float32
base_model: {a}
models:
  - model: {a}
    parameters: {{weight: 0.25}}
  - model: {b}
    parameters: {{weight: 0.75}}
tokenizer:
  source: {b}
  tokens:
{tokens}""")
    return str(p)


TOKENS = """    "[INST]":
      source: {kind: zero}
    "[/INST]":
      source: {kind: model_token, model: @A, token: "</s>"}
    "[TOOL_CALLS]":
      source: @B
    "<s>":
      source: {kind: model_token, model: @B, token_id: 5}
      force: true
    "</s>":
      source: @A
"""


def test_token_rows_by_hand(v1_v3, tmp_path):
    a, b = v1_v3
    out = build(recipe(tmp_path, a, b, TOKENS.replace("@A", str(a)).replace("@B", str(b))), str(tmp_path / "o"))
    got = load_file(str(next(out.glob("*.safetensors"))))["model.embed_tokens.weight"]
    ea = load_file(str(a / "model.safetensors"))["model.embed_tokens.weight"]
    eb = load_file(str(b / "model.safetensors"))["model.embed_tokens.weight"]
    v3 = read_hf(b).tokens
    v1 = read_hf(a).tokens
    ids = {t: v3.index(t) for t in ("[INST]", "[/INST]", "[TOOL_CALLS]", "<s>", "</s>", "▁the")}

    def lin(ra, rb):  # linear, normalized: (0.25·a + 0.75·b) / 1
        return (ra * 0.25 + rb * 0.75) / 1.0

    # the base lacks [INST]: its row is zero, b keeps its own
    torch.testing.assert_close(got[ids["[INST]"]], lin(torch.zeros(64), eb[ids["[INST]"]]), rtol=0, atol=1e-6)
    # [/INST]: the base takes its own row of </s>
    torch.testing.assert_close(got[ids["[/INST]"]], lin(ea[v1.index("</s>")], eb[ids["[/INST]"]]), rtol=0, atol=1e-6)
    # [TOOL_CALLS] from b's own row of it, for the base
    torch.testing.assert_close(got[ids["[TOOL_CALLS]"]], lin(eb[ids["[TOOL_CALLS]"]], eb[ids["[TOOL_CALLS]"]]),
                               rtol=0, atol=1e-6)
    # <s> forced: every model takes row 5 of b
    torch.testing.assert_close(got[ids["<s>"]], lin(eb[5], eb[5]), rtol=0, atol=1e-6)
    # </s>: both have it and nothing is forced: the override does nothing
    torch.testing.assert_close(got[ids["</s>"]], lin(ea[v1.index("</s>")], eb[ids["</s>"]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[ids["▁the"]], lin(ea[v1.index("▁the")], eb[ids["▁the"]]), rtol=0, atol=1e-6)


def test_token_override_errors(v1_v3, tmp_path):
    a, b = v1_v3
    with pytest.raises(GGMergeError, match="'<none>' is not in the merged vocabulary"):
        build(recipe(tmp_path, a, b, f'    "<none>":\n      source: {a}\n'), dry_run=True)
    with pytest.raises(GGMergeError, match=r"'\[INST\]' is not in the vocabulary of its source"):
        build(recipe(tmp_path, a, b, f'    "[INST]":\n      source: {a}\n'), dry_run=True)
    with pytest.raises(GGMergeError, match=r"'\[INST\]' needs a 'source'"):
        build(recipe(tmp_path, a, b, '    "[INST]":\n      force: true\n'), dry_run=True)
    with pytest.raises(GGMergeError, match="is not one of this stage's models"):
        build(recipe(tmp_path, a, b, '    "[INST]":\n      source: elsewhere\n'), dry_run=True)
    with pytest.raises(GGMergeError, match="give exactly one of token_id or token"):
        build(recipe(tmp_path, a, b, f'    "[INST]":\n      source: {{kind: model_token, model: {a}}}\n'),
              dry_run=True)


def test_token_overrides_equal_mergekit(v1_v3, tmp_path):
    mergekit_ref.require()
    a, b = v1_v3
    r = recipe(tmp_path, a, b, TOKENS.replace("@A", str(a)).replace("@B", str(b)))
    err, = mergekit_ref.run([(r, tmp_path / "mk", False, [])], tmp_path / "work")
    assert err is None, err
    ref = mergekit_ref.load_output(tmp_path / "mk")
    out = build(r, str(tmp_path / "gg"))
    got = load_file(str(next(out.glob("*.safetensors"))))
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].shape == ref[n].shape and torch.equal(got[n], ref[n]), n

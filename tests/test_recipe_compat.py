"""mergekit recipes run unchanged (issue 14, at the recipe loader's door): mergekit's chat template
names and ``auto``; the recipe problems a build would meet are found by the plan (so ``--dry-run``);
keys and parameters mergekit ignores are ignored with a warning (``strict`` refuses them); a recipe
without ``dtype:`` keeps the inputs' dtype."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from models import make_tiny_mistral
from safetensors import safe_open

from ggmerge.build import build, prepare
from ggmerge.errors import GGMergeError
from ggmerge.recipe.schema import parse_recipe
from ggmerge.tokenizer.templates import BUILTIN, MERGEKIT_NAMES, plurality_template

MERGEKIT_TEMPLATES = Path("/tmp/ggmerge-bench/venv-mergekit/lib/python3.11/site-packages/mergekit/_data/"
                          "chat_templates")

#: SHA-256 of mergekit 0.1.5's _data/chat_templates/<name>.jinja, as mergekit writes them
PINNED = {
    "alpaca": "95937b9bcf22b3759c6be7ca8d92d817e8c092c509bfcb6363c9cabfc09a4245",
    "chatml": "99000004eb5936e12e2cb9ba6449b7d194155b6439e8686f658b15cc71938b0b",
    "exaone": "add73d0750d7a20f8a9100f60e4a8c7e6e72fd02513816bc992a70da39cbf373",
    "llama3": "9d12985182ab0fcda12fd009b2a7f8d30a91c004857c472d5636f3cead82de56",
    "mistral": "796853172235ab3aaa4810013ddfe2eab481bda3306dad4f700c00d436eed596",
}

TEMPLATE_A = "{{ 'A' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
TEMPLATE_B = "{{ 'B' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


# --------------------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PINNED))
def test_builtin_template_bytes_are_pinned(name):
    assert name in MERGEKIT_NAMES
    assert hashlib.sha256(BUILTIN[name].encode("utf-8")).hexdigest() == PINNED[name]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_builtin_template_is_mergekits_text(name):
    f = MERGEKIT_TEMPLATES / f"{name}.jinja"
    if not f.is_file():
        pytest.skip(f"mergekit 0.1.5's templates are not installed here ({MERGEKIT_TEMPLATES})")
    # mergekit's _set_chat_template writes importlib.resources' read_text() of the file unchanged
    assert BUILTIN[name] == f.read_text(encoding="utf-8")
    assert BUILTIN[name].encode("utf-8") == f.read_bytes()


def test_template_forms_resolve_when_the_recipe_is_read(tmp_path):
    (tmp_path / "tmpl").mkdir()
    (tmp_path / "tmpl" / "chat.jinja").write_text(TEMPLATE_A, encoding="utf-8")
    base = "merge_method: linear\nmodels: [{model: m, parameters: {weight: 1}}]\n"
    for spec, want in (("chatml", BUILTIN["chatml"]), ("Vicuna", BUILTIN["vicuna"]),
                       ("tmpl/chat.jinja", TEMPLATE_A), (json.dumps(TEMPLATE_B), TEMPLATE_B)):
        st = parse_recipe(base + f"chat_template: {spec}\n", tmp_path / "r.yaml").output
        assert st.chat_template == want and not st.chat_template_auto, spec
    st = parse_recipe(base + "chat_template: auto\n", tmp_path / "r.yaml").output
    assert st.chat_template is None and st.chat_template_auto
    with pytest.raises(GGMergeError, match="did you mean 'llama3'") as e:
        parse_recipe(base + "chat_template: llama-3\n", tmp_path / "r.yaml")
    assert e.value.line == 3 and e.value.key == "chat_template" and e.value.path == tmp_path / "r.yaml"


def test_plurality_template():
    assert plurality_template([None, None]) is None
    # stripped as mergekit compares and writes them; the majority wins; a tie goes to the first (the base)
    assert plurality_template(["A", " B\n", "B", None]) == "B"
    assert plurality_template([None, "A\n", "B"]) == "A"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compat")
    base = make_tiny_mistral(root / "base", seed=1, chat_template=TEMPLATE_A)
    return {
        "base": base,
        "ft1": make_tiny_mistral(root / "ft1", seed=2, perturb_from=base, chat_template="  " + TEMPLATE_B + "\n"),
        "ft2": make_tiny_mistral(root / "ft2", seed=3, perturb_from=base, chat_template=TEMPLATE_B),
        "f16": make_tiny_mistral(root / "f16", seed=4, dtype=torch.float16),
        "f16b": make_tiny_mistral(root / "f16b", seed=5, perturb_from=root / "f16", dtype=torch.float16),
    }


def _recipe(tmp_path: Path, text: str) -> Path:
    r = tmp_path / "r" / "ggmerge.yaml"
    r.parent.mkdir(exist_ok=True)
    r.write_text(text)
    return r


def test_auto_template_takes_the_plurality_through_stages(family, tmp_path):
    # 'mid' is anchored on ft1, so it carries B; the output's inputs are base (A), mid (B), ft2 (B):
    # B wins only if the stage's template is seen (a tie A/B would go to the base's A)
    r = _recipe(tmp_path, f"""
name: mid
merge_method: linear
models:
  - model: {family['ft1']}
    parameters: {{weight: 1}}
  - model: {family['base']}
    parameters: {{weight: 1}}
---
merge_method: linear
models:
  - model: {family['base']}
    parameters: {{weight: 1}}
  - model: mid
    parameters: {{weight: 1}}
  - model: {family['ft2']}
    parameters: {{weight: 1}}
chat_template: auto
""")
    p = prepare(r)
    try:
        assert p.infos[-1].vocab.chat_template == TEMPLATE_B
        assert p.inputs.vocab(str(family["base"])).chat_template == TEMPLATE_A  # the leaf's own is untouched
    finally:
        p.close()


def test_chatml_build_writes_the_template_to_hf_and_gguf(family, tmp_path):
    import gguf

    from ggmerge.convert import convert

    r = _recipe(tmp_path, f"""
merge_method: task_arithmetic
base_model: {family['base']}
models:
  - model: {family['ft1']}
    parameters: {{weight: 0.5}}
chat_template: chatml
""")
    out = build(str(r), str(tmp_path / "out"))
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == BUILTIN["chatml"]
    g = convert(str(out), str(tmp_path / "m.gguf"), outtype="f32")
    assert gguf.GGUFReader(g).get_field("tokenizer.chat_template").contents() == BUILTIN["chatml"]


# --------------------------------------------------------------------------------------------------
# dtype: mergekit keeps the inputs'
# --------------------------------------------------------------------------------------------------

def _stored_dtypes(folder: Path) -> set[str]:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out |= {str(h.get_slice(k).get_dtype()) for k in h.keys()}
    return out


def test_no_dtype_keeps_float16_inputs_float16(family, tmp_path):
    r = _recipe(tmp_path, f"""
merge_method: task_arithmetic
base_model: {family['f16']}
models:
  - model: {family['f16b']}
    parameters: {{weight: 0.5}}
""")
    out = build(str(r), str(tmp_path / "out"))
    assert _stored_dtypes(out) == {"F16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_dtype_resolution_per_stage(family, tmp_path):
    def stages(text):
        p = prepare(_recipe(tmp_path, text))
        try:
            return [(s.label, s.dtype, s.out_dtype) for s in p.recipe.stages]
        finally:
            p.close()

    f16, f16b, bf = family["f16"], family["f16b"], family["base"]
    two = f"""
name: mid
merge_method: linear
models: [{{model: {f16}, parameters: {{weight: 1}}}}, {{model: {f16b}, parameters: {{weight: 1}}}}]
out_dtype: float32
---
merge_method: linear
models: [{{model: mid, parameters: {{weight: 1}}}}]
"""
    # an intermediate stage is read back in its out_dtype, as mergekit-multi saves it
    assert stages(two) == [("mid", torch.float16, torch.float32), ("output", torch.float32, None)]
    # bf16 inputs: bf16, as before; a given dtype wins
    one = f"merge_method: linear\nmodels: [{{model: {bf}, parameters: {{weight: 1}}}}]\n"
    assert stages(one)[0][1] == torch.bfloat16
    assert stages(one.replace(str(bf), str(f16)) + "dtype: bfloat16\n")[0][1] == torch.bfloat16
    # inputs that disagree: the base's (mergekit's task arithmetic casts its result to it)
    def mixed(base, model):
        return f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {model}, parameters: {{weight: 1}}}}]\n"

    assert stages(mixed(f16, bf))[0][1] == torch.float16
    assert stages(mixed(bf, f16))[0][1] == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# leniency and strict
# --------------------------------------------------------------------------------------------------

LENIENT = """merge_method: model_stock
base_model: b
models:
  - model: m1
    revision: main
    parameters: {weight: 0.5}
  - model: m2
dype: float16
"""


def test_ignored_keys_warn_with_file_line_and_hint(tmp_path, caplog):
    path = tmp_path / "r.yaml"
    with caplog.at_level(logging.WARNING, logger="ggmerge.recipe.schema"):
        r = parse_recipe(LENIENT, path)
    msgs = sorted(rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING)
    assert len(msgs) == 3, msgs
    assert msgs[0].startswith(f"{path}:5: key 'revision': unknown key 'revision' in a model entry (to pin a "
                              "revision, write it into the reference: 'model: org/name@REVISION')")
    assert msgs[1].startswith(f"{path}:6: key 'weight': merge_method 'model_stock' does not use parameter 'weight'")
    assert msgs[2].startswith(f"{path}:8: key 'dype': unknown key 'dype' in the recipe (did you mean 'dtype'?)")
    assert all(m.endswith("ignored, as mergekit does (--strict makes this an error)") for m in msgs)
    st = r.output
    assert st.models[0].params == {} and st.dtype is None  # ignored, so not used: what mergekit runs


def test_strict_refuses_them_all_at_once(tmp_path, caplog):
    with pytest.raises(GGMergeError, match=r"unknown key 'revision'.*\(and 2 more problem\(s\), listed above\)") as e:
        parse_recipe(LENIENT, tmp_path / "r.yaml", strict=True)
    assert e.value.line == 5
    assert [x.key for x in e.value.others] == ["weight", "dype"]


def test_ggmerge_block_stays_strict(tmp_path):
    # ggmerge's own block is not mergekit's: a typo there is still an error
    with pytest.raises(GGMergeError, match="unknown key 'sed' in ggmerge"):
        parse_recipe("merge_method: linear\nmodels: [{model: m, parameters: {weight: 1}}]\nggmerge: {sed: 1}\n",
                     tmp_path / "r.yaml")


def test_ignored_parameter_changes_nothing(family, tmp_path):
    text = f"""
merge_method: model_stock
base_model: {family['base']}
models:
  - model: {family['ft1']}
  - model: {family['ft2']}
dtype: float32
"""
    a = build(str(_recipe(tmp_path, text)), str(tmp_path / "a"))
    with_weight = text.replace(f"  - model: {family['ft2']}\n", f"  - model: {family['ft2']}\n    parameters: {{weight: 3}}\n")
    b = build(str(_recipe(tmp_path, with_weight)), str(tmp_path / "b"))
    # the files differ only in the recipe hash they record
    with safe_open(str(a / "model.safetensors"), framework="pt") as ha, \
            safe_open(str(b / "model.safetensors"), framework="pt") as hb:
        assert sorted(ha.keys()) == sorted(hb.keys())
        for k in ha.keys():
            assert torch.equal(ha.get_tensor(k), hb.get_tensor(k)), k


# --------------------------------------------------------------------------------------------------
# methods and per-tensor parameter problems
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["multislerp", "nearswap", "ram"])
def test_mergekit_methods_not_supported_yet(tmp_path, name):
    with pytest.raises(GGMergeError, match=f"merge_method '{name}' is a mergekit method ggmerge does not "
                                           r"support yet \(ggmerge supports: linear, .*passthrough, sce, karcher, arcee_fusion\)"):
        parse_recipe(f"merge_method: {name}\nmodels: [a, b]\n", tmp_path / "r.yaml")


def test_della_constraint_is_checked_for_every_tensor_at_plan_time(family, tmp_path):
    # only the mlp tensors break density + epsilon < 1: found by the plan (a dry run), naming one of them
    r = _recipe(tmp_path, f"""
merge_method: della
base_model: {family['base']}
models:
  - model: {family['ft1']}
    parameters:
      weight: 0.5
      density: 0.5
      epsilon: [{{filter: mlp, value: 0.5}}, {{value: 0.1}}]
  - model: {family['ft2']}
    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.4}}
""")
    with pytest.raises(GGMergeError, match=r"della needs 0 < density - epsilon and density \+ epsilon < 1 "
                                           r"\(density=0.5, epsilon=0.5\)") as e:
        build(str(r), dry_run=True)
    assert "mlp" in e.value.tensor and e.value.line == 5 and e.value.key == "epsilon"
    assert e.value.others == []  # ft2's 0.4 is fine


def test_modules_default_is_the_plain_form(tmp_path):
    # mergekit's one-module architectures: modules.default.{models, parameters} is the plain document with
    # the module's parameters overriding the document's (ConfigReader.parameter_sources)
    mod = parse_recipe("merge_method: ties\nbase_model: b\nparameters: {density: 0.5, weight: 0.1}\n"
                       "modules:\n  default:\n    parameters: {weight: 0.3}\n"
                       "    models: [{model: a, parameters: {density: 0.7}}, {model: c}]\n",
                       tmp_path / "r.yaml").output
    flat = parse_recipe("merge_method: ties\nbase_model: b\nparameters: {density: 0.5, weight: 0.3}\n"
                        "models: [{model: a, parameters: {density: 0.7}}, {model: c}]\n", tmp_path / "s.yaml").output
    assert [(m.ref, m.params) for m in mod.models] == [(m.ref, m.params) for m in flat.models]
    assert mod.params == flat.params == {"density": 0.5, "weight": 0.3}
    sl = parse_recipe("merge_method: passthrough\nmodules:\n  default:\n    slices:\n"
                      "      - sources: [{model: a, layer_range: [0, 2]}]\n", tmp_path / "t.yaml").output
    assert sl.slices[0].sources[0].layer_range == (0, 2)
    with pytest.raises(GGMergeError, match="one module, 'default'"):
        parse_recipe("merge_method: linear\nmodules:\n  text_decoder: {models: [a]}\n", tmp_path / "u.yaml")
    with pytest.raises(GGMergeError, match="exactly one of 'models', 'slices' or 'modules'"):
        parse_recipe("merge_method: linear\nmodels: [a]\nmodules:\n  default: {models: [a]}\n", tmp_path / "v.yaml")


def test_filter_entry_without_filter_key_matches_everything(tmp_path, caplog):
    # mergekit's own examples/gradient-slerp.yml writes `pattern:`; mergekit's pydantic model drops it,
    # so each entry has no filter and the first one matches every tensor: the same here, with a warning
    text = ("merge_method: slerp\nbase_model: a\nmodels: [a, b]\nparameters:\n  t:\n"
            "    - pattern: self_attn\n      value: [0, 1]\n    - value: 0.5\n")
    with caplog.at_level(logging.WARNING):
        st = parse_recipe(text, tmp_path / "r.yaml").output
    assert any("unknown key(s) ['pattern']" in r.message and "matches every tensor" in r.message
               for r in caplog.records)
    from ggmerge.recipe.params import resolve
    assert resolve(st.params["t"], "model.layers.3.mlp.up_proj.weight", 3, 4, kind=float) == 1.0
    with pytest.raises(GGMergeError, match="unknown key"):
        parse_recipe(text, tmp_path / "r.yaml", strict=True)


def test_duplicate_key_keeps_the_last_value(tmp_path, caplog):
    text = "merge_method: ties\nmodels: [a]\nmerge_method: linear\n"
    with caplog.at_level(logging.WARNING):
        st = parse_recipe(text, tmp_path / "r.yaml").output
    assert st.method.name == "linear"
    assert any("key 'merge_method' is given again at line 3" in r.message for r in caplog.records)

"""Real published mergekit recipes run unchanged (issue 14's corpus), checked against mergekit itself.

``tests/recipes_corpus/*.yml`` are 30 recipes in their published form (mergekit's examples and docs,
Hugging Face model cards, GitHub repositories, mergekit issues; each file's first line names its
source). Here their model names are mapped to tiny local models (a base and five fine-tunes of it,
40 layers so every published layer range exists, hidden 16, the real Mistral v1 vocabulary; a PEFT
LoRA adapter for the ``model+lora`` recipe) and:

* the published form loads and plans (``ggmerge.build.prepare``: every check a build and a dry run make);
* a float32 variant (``dtype: float32`` in every document, ``out_dtype`` dropped; 16-bit arithmetic in
  mergekit would otherwise differ by rounding) is built by ggmerge and, where mergekit 0.1.5 is
  installed (tests/mergekit_ref.py), by mergekit too: the same tensor names and shapes, and for every
  recipe without random masks (DARE/DELLA with density < 1) the same float32 values, bit for bit.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import mergekit_ref
from ggmerge.build import build, prepare
from models import make_lora_adapter, make_tiny_mistral

CORPUS_DIR = Path(__file__).parent / "recipes_corpus"
ABSA_FT = "D:/Uni/Masterarbeit Code/jakob_finetuning/finetuned_models/meta_llama_full_colab_remerge_2"
ABSA_DE = ("D:/Huggingface/hub/models--VAGOsolutions--Llama-3.1-SauerkrautLM-8b-Instruct/snapshots/"
           "221e5f92f9dc5fedaf4556b1be6b20642638643c")
ABSA = {ABSA_FT: "ft1", ABSA_DE: "ft2", "unsloth/Meta-Llama-3.1-8B-Instruct": "base"}
NEMO = "C:\\Users\\\\Downloads\\Mergekit-Fixed\\mergekit\\"

#: file -> (published model name -> local alias, random masks?, needs the output of another recipe)
CORPUS: dict[str, tuple[dict[str, str], bool]] = {
    "mk_linear.yml": ({"psmathur/orca_mini_v3_13b": "ft1", "WizardLM/WizardLM-13B-V1.2": "ft2",
                       "garage-bAInd/Platypus2-13B": "ft3"}, False),
    "mk_bio_merge.yml": ({"mistralai/Mistral-7B-Instruct-v0.2": "ft1", "BioMistral/BioMistral-7B": "ft2",
                          "mistralai/Mistral-7B-v0.1": "base"}, False),
    "mk_gradient_slerp.yml": ({"psmathur/orca_mini_v3_13b": "base", "garage-bAInd/Platypus2-13B": "ft1"}, False),
    "mk_orcamini_platy_44layer.yml": ({"psmathur/orca_mini_v3_13b": "ft1", "garage-bAInd/Platypus2-13B": "ft2"},
                                      False),
    "mk_arcee_fusion.yml": ({"model_a": "base", "model_b": "ft1"}, False),
    "mk_multimerge.yml": ({"mistralai/Mistral-7B-v0.1": "base", "BioMistral/BioMistral-7B": "ft1",
                           "NousResearch/Hermes-2-Pro-Mistral-7B": "ft2",
                           "teknium/OpenHermes-2.5-Mistral-7B": "ft3"}, True),
    "hf_llama3_13b_backload.yml": ({"meta-llama/Meta-Llama-3-8B-Instruct": "ft1"}, False),
    "hf_holland_magnum_r2.yml": ({"Delta-Vector/Holland-4B-V1": "base", "NewEden/Holland-V2": "ft1",
                                  "anthracite-org/magnum-v2-4b": "ft2"}, False),
    "hf_gemma_moon_2_9b.yml": ({"spacematt/Gemma-Bloom-2-9B-it": "base", "spacematt/Gemma-Lingua-2-9B-it": "ft1",
                                "spacematt/Gemma-Loom-2-9B-it": "ft2"}, True),
    "hf_yoyo_super_prev.yml": ({"Qwen/Qwen2.5-7B-Instruct": "ft1", "Qwen/Qwen2.5-7B-Instruct-1M": "ft2",
                                "Qwen/Qwen2.5-7B": "base"}, False),
    "hf_sapientia_occulta_12b.yml": ({"yamatazen/EsotericSage-12B": "base",
                                      "DreadPoor/Famino-12B-Model_Stock": "ft1"}, True),
    "hf_ethos_alpha_70b.yml": ({"Doctor-Shotgun/L3.3-70B-Magnum-v4-SE": "ft1", "Sao10K/70B-L3.3-mhnnn-x1": "ft2",
                                "Sao10K/70B-L3.3-Cirrus-x1": "ft3", "EVA-UNIT-01/EVA-LLaMA-3.33-70B-v0.1": "ft4",
                                "Sao10K/L3.3-70B-Euryale-v2.3": "ft5", "meta-llama/Llama-3.3-70B-Instruct": "base"},
                               True),
    "hf_della_math_code_modules.yml": ({"Alelcv27/Llama3.1-8B-Base-Code": "ft1",
                                        "Alelcv27/Llama3.1-8B-Base-Math": "ft2", "meta-llama/Llama-3.1-8B": "base"},
                                       True),
    "hf_della_linear_biomistral_hindi.yml": ({"BioMistral/BioMistral-7B": "base"}, False),
    "hf_stellar_odyssey_12b.yml": ({NEMO + "Sao10K_MN-12B-Lyra-v4": "ft1",
                                    NEMO + "nothingiisreal_MN-12B-Starcannon-v2": "ft2",
                                    NEMO + "Gryphe_Pantheon-RP-1.5-12b-Nemo": "ft3",
                                    NEMO + "mistralai_Mistral-Nemo-Base-2407": "base"}, True),
    "hf_lunamaid_12b_stage1.yml": ({"Vortex5/Vermilion-Sage-12B": "base", "yamatazen/NeonMaid-12B-v2": "ft1"}, False),
    # stage 2 reads stage 1's output (the card's ./intermediates/First)
    "hf_lunamaid_12b_stage2.yml": ({"./intermediates/First": "@hf_lunamaid_12b_stage1.yml",
                                    "Vortex5/Moonlit-Shadow-12B": "ft2"}, False),
    "issue_model_stock.yml": ({"model_1": "ft1", "model_2": "ft2", "model_3": "ft3", "base_model": "base"}, False),
    "issue_lora_linear.yml": ({"example/model1": "base", "example/model2_LoRA": "lora"}, False),
    "gh_llama3_linear_union.yml": ({"flammenai/Mahou-1.3-llama3-8B": "ft1", "Danielbrdz/Barcenas-Llama3-8b-ORPO": "ft2",
                                    "Weyaxi/Einstein-v6.1-Llama3-8B": "ft3"}, False),
    "absa_sce_075.yml": (ABSA, False),
    "absa_karcher_default.yml": (ABSA, False),
    "absa_arcee_fusion.yml": (ABSA, False),
    "absa_nuslerp_50_50.yml": (ABSA, False),
    "absa_linear_layer_specific.yml": (ABSA, False),
    "absa_task_arithmetic_lambda_07.yml": (ABSA, False),
    "absa_slerp_t_05_with_tokenizer.yml": (ABSA, False),
    "absa_slerp_v_shape.yml": (ABSA, False),
    "absa_dare_ties_1_085_weight.yml": (ABSA, False),
    "absa_della_linear_1_08_08_07_01_02.yml": (ABSA, True),
}


#: not run by mergekit here: its karcher takes every one of the 9999 steps per tensor the card asks
#: for (tol 1e-9 is never reached in float32): over ten minutes on these tiny models. ggmerge jumps
#: the float32 cycle of the iteration instead (test_methods.py checks the jump changes no bit).
MERGEKIT_TOO_SLOW = {"hf_lunamaid_12b_stage2.yml": "mergekit runs all 9999 karcher steps of every tensor"}

#: KNOWN GAP: Model Stock on a tensor bigger than one row chunk (the 32000 x 16 embedding and lm_head)
#: takes its cosines from a float64 Gram matrix gathered chunk by chunk (evaluator.py), not mergekit's
#: float32 whole-tensor sums: those two tensors differ by a few float32 ulps; the rest is bit-identical.
KNOWN_ULPS = {"issue_model_stock.yml"}


def test_corpus_is_complete():
    files = sorted(p.name for p in CORPUS_DIR.glob("*.yml"))
    assert files == sorted(CORPUS) and len(files) >= 25
    for f in files:
        first = (CORPUS_DIR / f).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# source: http"), f


@pytest.fixture(scope="module")
def corpus_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus_models")
    dims = dict(layers=40, hidden=16, heads=2, kv_heads=1, intermediate=32)
    base = make_tiny_mistral(root / "base", seed=0, **dims)
    out = {"base": base}
    for k in range(1, 6):
        out[f"ft{k}"] = make_tiny_mistral(root / f"ft{k}", seed=k, perturb_from=base, scale=0.05)
    out["lora"] = make_lora_adapter(root / "lora", base, r=2, alpha=4)
    return out


def _localize(text: str, mapping: dict[str, str], paths: dict[str, Path]) -> str:
    """Replace each published model name where it is a YAML value (not a key such as ``base_model:``)."""
    for name in sorted(mapping, key=len, reverse=True):
        pat = re.compile(r"(?<=[\s:+\"'])" + re.escape(name) + r"(?=[\"']?(?:\s|$|\+))(?!:)")
        text = pat.sub(lambda _m, n=name: str(paths[mapping[n]]).replace("\\", "/"), text)
    return text


def _float32_variant(text: str) -> tuple[str, bool]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    for d in docs:
        d["dtype"] = "float32"
        d.pop("out_dtype", None)
    return yaml.safe_dump_all(docs, sort_keys=False), len(docs) > 1


@pytest.fixture(scope="module")
def corpus_runs(corpus_models, tmp_path_factory):
    """Each recipe localized: (published text, float32 variant, multi?, ggmerge output or error)."""
    work = tmp_path_factory.mktemp("corpus")
    paths = dict(corpus_models)
    runs = {}
    for name, (mapping, _random) in CORPUS.items():  # dict order: a stage before the recipe reading it
        for alias in mapping.values():
            if alias.startswith("@"):
                paths[alias] = runs[alias[1:]]["gg_out"]
        text = _localize((CORPUS_DIR / name).read_text(encoding="utf-8"), mapping, paths)
        f32, multi = _float32_variant(text)
        d = work / name.removesuffix(".yml")
        d.mkdir()
        (d / "published.yml").write_text(text, encoding="utf-8")
        (d / "f32.yml").write_text(f32, encoding="utf-8")
        run = {"dir": d, "multi": multi, "gg_out": d / "gg", "error": None}
        try:
            prepare(str(d / "published.yml")).close()  # every check of a build (--dry-run's plan)
            build(str(d / "f32.yml"), str(d / "gg"))
        except Exception as exc:  # noqa: BLE001 - reported by the recipe's own test
            run["error"] = f"{type(exc).__name__}: {exc}"
        runs[name] = run
    return runs


@pytest.mark.parametrize("name", list(CORPUS))
def test_ggmerge_builds_published_recipe(corpus_runs, name):
    run = corpus_runs[name]
    assert run["error"] is None, run["error"]
    assert any(run["gg_out"].glob("*.safetensors"))


@pytest.fixture(scope="module")
def mergekit_runs(corpus_runs):
    mergekit_ref.require()
    errors = {}
    # two batches: recipes that read another recipe's output run after it (mergekit's output is used)
    later = {n for n, (m, _) in CORPUS.items() if any(a.startswith("@") for a in m.values())}
    errors.update({n: None for n in MERGEKIT_TOO_SLOW})
    for batch in ([n for n in CORPUS if n not in later and n not in MERGEKIT_TOO_SLOW],
                  sorted(later - set(MERGEKIT_TOO_SLOW))):
        jobs = []
        for n in batch:
            run = corpus_runs[n]
            f32 = run["dir"] / "f32.yml"
            if n in later:  # read mergekit's own output of the earlier recipe
                text = f32.read_text(encoding="utf-8")
                for a in {a for a in CORPUS[n][0].values() if a.startswith("@")}:
                    text = text.replace(str(corpus_runs[a[1:]]["gg_out"]), str(corpus_runs[a[1:]]["dir"] / "mk"))
                f32 = run["dir"] / "f32-mk.yml"
                f32.write_text(text, encoding="utf-8")
            jobs.append((f32, run["dir"] / "mk", run["multi"],
                         ["--lora-merge-cache", str(run["dir"] / "lora-cache")]))
        if jobs:
            errors.update(zip(batch, mergekit_ref.run(jobs, corpus_runs[batch[0]]["dir"].parent / "mk-work")))
    return errors


@pytest.mark.parametrize("name", list(CORPUS))
def test_output_equals_mergekit(corpus_runs, mergekit_runs, name):
    if name in MERGEKIT_TOO_SLOW:
        pytest.skip(MERGEKIT_TOO_SLOW[name])
    run = corpus_runs[name]
    assert mergekit_runs[name] is None, f"mergekit failed: {mergekit_runs[name]}"
    assert run["error"] is None, run["error"]
    ref = mergekit_ref.load_output(run["dir"] / "mk")
    ours = mergekit_ref.load_output(run["gg_out"])
    assert sorted(ours) == sorted(ref)
    for t in ref:
        assert ours[t].shape == ref[t].shape and ours[t].dtype == ref[t].dtype == torch.float32, t
    if CORPUS[name][1]:
        return  # DARE/DELLA masks are random: mergekit draws from torch's global RNG, ggmerge per tensor
    bad = [t for t in ref if not torch.equal(ours[t], ref[t])]
    if name in KNOWN_ULPS:
        assert set(bad) <= {"model.embed_tokens.weight", "lm_head.weight"}, bad
        for t in bad:
            torch.testing.assert_close(ours[t], ref[t], rtol=4 * 2.0 ** -23, atol=1e-6)
        return
    assert not bad, f"{len(bad)} of {len(ref)} tensors differ, e.g. {bad[0]}: max |Δ| " \
                    f"{(ours[bad[0]] - ref[bad[0]]).abs().max().item():.3g}"

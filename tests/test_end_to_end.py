"""The bundled example, end to end through the real CLI: build → quantize → llama.cpp.

Thresholds for ``verify`` were measured on this example (random-weight tiny models: no learned
structure, which is the worst case for quantization): F16 KL 3e-7 / top-1 0.998; Q8_0 KL 5e-4 / top-1
0.92; Q4_K_M KL 4.8e-2 / top-1 0.46. The bounds below leave ~5-10x headroom and would still catch a
broken file (a wrong permutation or vocab gives KL > 1 and top-1 near chance, 1/32000).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ggmerge.cli import main
from ggmerge.prompts import SEED_CONVERSATION, SEED_PROMPT_TURN2

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "examples" / "ninja-mini" / "ggmerge.yaml"
REAL = ROOT / "examples" / "ninja-v1-rp-expressive" / "ggmerge.yaml"

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ninja-mini")
    shutil.copy(MINI, d / "ggmerge.yaml")
    return d


@pytest.fixture(scope="module")
def built(example) -> Path:
    import os

    cwd = os.getcwd()
    os.chdir(example)
    try:
        assert main(["build"]) == 0
        assert main(["quantize", "q4_k_m"]) == 0
        assert main(["quantize", "Q8_0"]) == 0
        assert main(["convert", "out/ninja-mini", "-o", "out/ninja-mini.F16.gguf", "--outtype", "f16"]) == 0
    finally:
        os.chdir(cwd)
    return example / "out"


@pytest.mark.slow
def test_outputs_laid_out_predictably(built):
    assert (built / "ninja-mini" / "model.safetensors").is_file()
    assert (built / "ninja-mini" / "ggmerge-build.json").is_file()
    assert (built / "ninja-mini.Q4_K_M.gguf").is_file()
    assert not list(built.rglob("*.ggmerge-partial"))


@pytest.mark.slow
def test_q4_k_m_renders_the_seed_prompt_and_generates(built):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from ggmerge.llamacpp import load

    llm = load(built / "ninja-mini.Q4_K_M.gguf", n_ctx=1024, f32_cache=False)
    try:
        template = llm.metadata["tokenizer.chat_template"]
        fmt = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")
        prompt = fmt(messages=SEED_CONVERSATION).prompt
        assert prompt == SEED_PROMPT_TURN2
        out = llm.create_completion(prompt, max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0
    finally:
        llm.close()


@pytest.mark.slow
def test_verify_reports_numbers_within_expected_bounds(built):
    from ggmerge.verify import verify

    res = {r.file_type: r for r in verify([str(built / f"ninja-mini.{t}.gguf") for t in ("F16", "Q8_0", "Q4_K_M")],
                                          hf=str(built / "ninja-mini"))}
    assert all(r.tokens_match for r in res.values())
    assert res["F16"].kl_mean < 1e-5 and res["F16"].top1_agreement > 0.99
    assert res["Q8_0"].kl_mean < 5e-3 and res["Q8_0"].top1_agreement > 0.8
    assert res["Q4_K_M"].kl_mean < 0.3
    assert res["F16"].kl_mean < res["Q8_0"].kl_mean < res["Q4_K_M"].kl_mean


@pytest.mark.slow
def test_rerun_is_up_to_date(example, built, capsys):
    import os

    stamp = (built / "ninja-mini" / "model.safetensors").stat().st_mtime_ns
    cwd = os.getcwd()
    os.chdir(example)
    try:
        assert main(["build"]) == 0
    finally:
        os.chdir(cwd)
    assert (built / "ninja-mini" / "model.safetensors").stat().st_mtime_ns == stamp


def _fake_hub(cache: Path, models: Path) -> None:
    """A cache laid out like huggingface_hub's: models--org--name/{refs/main, snapshots/<rev>/, blobs/}."""
    import hashlib

    ids = {
        "mistralai/Mistral-7B-v0.1": "Mistral-7B-v0.1",
        "mistralai/Mistral-7B-Instruct-v0.2": "Mistral-7B-Instruct-v0.2",
        "Elizezen/Antler-7B": "Antler-7B",
        "senseable/WestLake-7B-v2": "WestLake-7B-v2",
        "SanjiWatsuki/Kunoichi-DPO-v2-7B": "Kunoichi-DPO-v2-7B",
        "SanjiWatsuki/Silicon-Maid-7B": "Silicon-Maid-7B",
        "SanjiWatsuki/Loyal-Macaroni-Maid-7B": "Loyal-Macaroni-Maid-7B",
        "Aratako/Ninja-v1-RP": "Ninja-v1-RP",
    }
    for hub_id, role in ids.items():
        repo = cache / ("models--" + hub_id.replace("/", "--"))
        rev = hashlib.sha1(hub_id.encode()).hexdigest()
        snap = repo / "snapshots" / rev
        (repo / "blobs").mkdir(parents=True)
        snap.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(rev)
        for f in (models / role).iterdir():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snap / f.name).symlink_to(Path("../../blobs") / blob.name)


def test_real_recipe_dry_run_against_a_fake_hf_cache(tmp_path, monkeypatch, capsys):
    from ggmerge.miniature import ROLES, config, write_model

    small = config(hidden_size=64, intermediate_size=128, vocab_size=32000)
    for role in ROLES:
        write_model(tmp_path / "m" / role, role, small)
    _fake_hub(tmp_path / "hub", tmp_path / "m")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["build", str(REAL), "--dry-run"]) == 0
    text = capsys.readouterr().out
    for needle in ("Antler-7B-CV-Kunoichi", "model_stock", "dare_ties", "Aratako/Ninja-v1-RP",
                   "output tensors: 21"):
        assert needle in text, needle
    assert not (REAL.parent / "out").exists()
    # and a missing model is named
    import shutil as sh

    sh.rmtree(tmp_path / "hub" / "models--Aratako--Ninja-v1-RP")
    assert main(["build", str(REAL), "--dry-run"]) == 1
    assert "Aratako/Ninja-v1-RP" in capsys.readouterr().err

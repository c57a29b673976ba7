"""The merge engine end to end on tiny models: the seed's three stages give the tensors its formulas
predict, in one streaming pass, reproducibly."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ggmerge.build import build, prepare
from ggmerge.miniature import ROLES, config, write_model
from ggmerge.evaluator import Evaluator

SMALL = config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2)
RECIPE = Path(__file__).resolve().parents[1] / "examples" / "ninja-mini" / "ggmerge.yaml"


@pytest.fixture(scope="module")
def lineage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lineage")
    for role in ROLES:
        write_model(root / "models" / role, role, SMALL)
    text = RECIPE.read_text().replace("  miniature: models\n", "")
    (root / "ggmerge.yaml").write_text(text)
    return root


def _load(folder: Path, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name).float()


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _close_bf16(got: torch.Tensor, want: torch.Tensor, ulps: float = 1.0) -> None:
    """Within ``ulps`` bf16 ulps of max(|x|, rms): float32 sums in another order may round differently."""
    scale = torch.maximum(want.abs(), want.pow(2).mean().sqrt())
    ulp = scale * 2.0 ** -7
    assert ((got - want).abs() <= ulps * ulp + 1e-12).all(), float(((got - want).abs() / ulp).max())


NAMES = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
         "model.embed_tokens.weight", "model.norm.weight"]


def test_stage1_is_chat_vector_plus_task_vector(lineage):
    p = prepare(lineage / "ggmerge.yaml")
    ev = Evaluator(p.recipe, p.inputs)
    m = lineage / "models"
    for name in NAMES:
        A, I, B, K = (_load(m / r, name) for r in ("Antler-7B", "Mistral-7B-Instruct-v0.2", "Mistral-7B-v0.1",
                                                   "Kunoichi-DPO-v2-7B"))
        want = _bf16(A + 0.8 * (I - B) + 0.8 * (K - B))
        _close_bf16(ev.tensor(name, stage="Antler-7B-CV-Kunoichi"), want)
        _close_bf16(ev.tensor(name, stage="Antler-7B-CV"), _bf16(A + 0.8 * (I - B)))
    p.close()


def test_stage2_is_model_stock_of_the_five(lineage):
    p = prepare(lineage / "ggmerge.yaml")
    ev = Evaluator(p.recipe, p.inputs)
    name = "model.layers.0.self_attn.o_proj.weight"
    base = ev.tensor(name, stage="Antler-7B-CV")
    others = [ev.tensor(name, stage=s) for s in ("Antler-7B-CV-Kunoichi", "Antler-7B-CV-SiliconMaid",
                                                  "Antler-7B-CV-WestLake", "Antler-7B-CV-LoyalMacaroniMaid")]
    d = [(o - base).flatten().double() for o in others]
    cos = [float(a @ b / (a.norm() * b.norm())) for i, a in enumerate(d) for b in d[i + 1:]]
    c = sum(cos) / len(cos)
    n = len(others)
    t = n * c / (1 + (n - 1) * c)
    want = _bf16((t * (sum(others) / n) + (1 - t) * base).float())
    _close_bf16(ev.tensor(name, stage="Antler-7B-MS"), want)
    p.close()


def test_stage3_dare_ties_halves_the_rescaled_delta(lineage):
    p = prepare(lineage / "ggmerge.yaml")
    ev = Evaluator(p.recipe, p.inputs)
    name = "model.layers.1.mlp.up_proj.weight"
    ninja = _load(lineage / "models" / "Ninja-v1-RP", name)
    ms = ev.tensor(name, stage="Antler-7B-MS")
    out = ev.tensor(name)
    delta = ms - ninja
    kept = (out - ninja) != 0
    frac = kept.float().mean().item()
    assert 0.66 < frac < 0.74, frac                    # density 0.7
    # rescale keeps the L1 norm of the delta: factor = |δ|₁ / |masked δ|₁; weight 0.5
    factor = delta.abs().sum() / (delta * kept).abs().sum()
    torch.testing.assert_close(out[kept], ninja[kept] + 0.5 * factor * delta[kept], rtol=1e-5, atol=1e-6)
    # the same tensor again: the same mask (seeded per recipe seed + tensor name)
    assert torch.equal(ev.tensor(name), out)
    p.close()


def test_build_writes_model_and_is_reproducible(lineage, tmp_path):
    out1 = build(str(lineage / "ggmerge.yaml"), str(tmp_path / "a"))
    out2 = build(str(lineage / "ggmerge.yaml"), str(tmp_path / "b"))
    files = sorted(p.name for p in out1.iterdir())
    for must in ("config.json", "generation_config.json", "tokenizer_config.json", "README.md", "ggmerge-build.json"):
        assert must in files
    for f in out1.glob("*.safetensors"):
        assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256((out2 / f.name).read_bytes()).digest()
    rec = json.loads((out1 / "ggmerge-build.json").read_text())
    assert rec["recipe_sha256"] == hashlib.sha256((lineage / "ggmerge.yaml").read_bytes()).hexdigest()
    assert set(rec["inputs"]) == {f"models/{r}" for r in ROLES}
    card = (out1 / "README.md").read_text()
    assert "dare_ties" in card and rec["outputs"]["model.safetensors"] in card
    cfg = json.loads((out1 / "config.json").read_text())
    assert cfg["vocab_size"] == 32000 and cfg["num_hidden_layers"] == 2
    tok = json.loads((out1 / "tokenizer_config.json").read_text())
    assert "USER: " in tok["chat_template"] and "ASSISTANT:" in tok["chat_template"]


def test_rebuild_is_skipped_when_up_to_date(lineage, tmp_path, caplog):
    out = build(str(lineage / "ggmerge.yaml"), str(tmp_path / "o"))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO")
    build(str(lineage / "ggmerge.yaml"), str(tmp_path / "o"))
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert "up to date" in caplog.text


def test_input_fingerprints_sampled_by_default_full_on_request(lineage, tmp_path, monkeypatch):
    """Large inputs are fingerprinted from a few MiB (no second read of the model); --hash-inputs records
    the real SHA-256; both change when a weight deep inside the file changes."""
    import shutil

    import ggmerge.fingerprint as fp

    monkeypatch.setattr(fp, "SAMPLE_MIN", 1000)  # the tiny test models count as large
    monkeypatch.setenv("GGMERGE_CACHE", str(tmp_path / "cache"))
    f = lineage / "models" / "Ninja-v1-RP" / "model.safetensors"
    sampled = fp.fingerprint(f.parent)["model.safetensors"]
    assert sampled.startswith(fp.SAMPLED) and sampled == fp.fingerprint(f.parent)["model.safetensors"]
    assert fp.fingerprint(f.parent, full=True)["model.safetensors"] == hashlib.sha256(f.read_bytes()).hexdigest()
    # once the full hash is known (cached by path, size, mtime) it is used
    assert fp.fingerprint(f.parent)["model.safetensors"] == hashlib.sha256(f.read_bytes()).hexdigest()
    copy = tmp_path / "copy"
    shutil.copytree(f.parent, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    at = len(data) * 100 // 257 + 5  # inside the 100th sample
    data[at] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    changed = fp.fingerprint(copy)["model.safetensors"]
    assert changed.startswith(fp.SAMPLED) and changed != sampled

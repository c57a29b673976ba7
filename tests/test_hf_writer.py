"""HF writer against golden bytes, safetensors' own serializer and reader, and transformers' loader;
the model card against a YAML parser."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from ggmerge.errors import GGMergeError
from ggmerge.sources import open_source
from ggmerge.writers.card import model_card
from ggmerge.writers.hf import HFWriter
from test_sources import reset_peak, vm_mb


def test_golden_bytes_of_a_tiny_file(tmp_path):
    with HFWriter(tmp_path / "out") as w:
        w.add("a", torch.tensor([1.0, -2.0]))
        w.add("b.weight", torch.tensor([[0.5], [3.0]]))
        w.finish({"model_type": "llama"})
    header = (b'{"__metadata__":{"format":"pt"},'
              b'"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},'
              b'"b.weight":{"dtype":"BF16","shape":[2,1],"data_offsets":[4,8]}}')
    header += b" " * (-len(header) % 8)
    golden = (len(header).to_bytes(8, "little") + header
              + bytes.fromhex("803f" "00c0")     # bf16 1.0, -2.0 little-endian
              + bytes.fromhex("003f" "4040"))    # bf16 0.5, 3.0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == golden
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors"]


def test_byte_identical_to_safetensors_save_file(tmp_path):
    """Added in safetensors' own order (dtype, then name), our streamed file equals save_file's."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.w": torch.randn(3 + i, 5, generator=g) for i in range(4)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16")):
        ref = tmp_path / f"ref-{name}.safetensors"
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(ref), metadata={"format": "pt"})
        with HFWriter(tmp_path / name, dtype=name) as w:
            for k in sorted(tensors):
                w.add(k, tensors[k])
            w.finish({})
        assert (tmp_path / name / "model.safetensors").read_bytes() == ref.read_bytes(), name


def test_rounding_and_metadata(tmp_path):
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(1)) * 3
    x[0, :4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 65504.0 * 8])  # ties → even
    with HFWriter(tmp_path / "m", metadata={"ggmerge.recipe_sha256": "ab" * 32, "n": 3}) as w:
        w.add("x", x)
        w.finish({"bos_token_id": 1, "eos_token_id": 2})
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "ggmerge.recipe_sha256": "ab" * 32, "n": "3"}
        got = f.get_tensor("x")
    assert got.dtype == torch.bfloat16 and torch.equal(got, x.to(torch.bfloat16))
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text()) == {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["dtype"] == "bfloat16"


def test_sharding_index_and_transformers_load(tiny_mistral, tmp_path):
    src = open_source(tiny_mistral)
    sizes = {n: 2 * torch.Size(src.shape(n)).numel() for n in src.names()}
    limit = max(sizes.values()) + 1  # embed and lm_head each fill a shard: at least 3 shards
    out = tmp_path / "sharded"
    with HFWriter(out, max_shard_bytes=limit) as w:
        for n in src.names():
            w.add(n, src.load(n))
        w.finish(src.config(), extra_files={"README.md": "# tiny\n"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert set(index["weight_map"]) == set(src.names())
    for fname in files:
        with safe_open(str(out / fname), framework="pt") as f:
            keys = list(f.keys())
            assert all(index["weight_map"][k] == fname for k in keys)
            assert len(keys) == 1 or sum(sizes[k] for k in keys) <= limit
    assert (out / "README.md").read_text() == "# tiny\n"
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no spill files left
    # bf16 in, bf16 out: bit for bit, and transformers gives the very same logits
    back = open_source(out)
    for n in src.names():
        assert torch.equal(back.load(n), src.load(n)), n
    from models import load_hf_model

    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28723]])
    with torch.no_grad():
        ref = load_hf_model(tiny_mistral)(ids).logits
        got = load_hf_model(out)(ids).logits
    assert torch.equal(got, ref)


def test_tokenizer_files_from_vocab(tiny_mistral, tmp_path):
    from transformers import AutoTokenizer

    from ggmerge.tokenizer.hf_vocab import read_hf
    from models import SEED_PROMPT_TURN1

    src = open_source(tiny_mistral)
    with HFWriter(tmp_path / "tok") as w:
        w.add("model.norm.weight", src.load("model.norm.weight"))
        w.finish(src.config(), vocab=read_hf(tiny_mistral))
    ours = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ref = AutoTokenizer.from_pretrained(tiny_mistral)
    # (text after a special token such as "</s>" depends on the tokenizer's "legacy" setting, which is
    # hf_files' business and tested there; here: the files the writer wrote are the ones it was given)
    assert ours(SEED_PROMPT_TURN1)["input_ids"] == ref(SEED_PROMPT_TURN1)["input_ids"]
    assert len(ours) == len(ref) == 32000


def test_failure_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"):
        with HFWriter(out, max_shard_bytes=16) as w:
            w.add("a", torch.ones(8))
            w.add("b", torch.ones(8))
            raise RuntimeError("boom")
    assert not out.exists() and os.listdir(tmp_path) == []
    out.mkdir()
    (out / "keep.txt").write_text("old")
    w = HFWriter(out)
    w.add("a", torch.ones(2))
    with pytest.raises(GGMergeError, match="written twice"):
        w.add("a", torch.ones(2))
    w.abort()
    assert os.listdir(tmp_path) == ["model"] and (out / "keep.txt").read_text() == "old"
    with pytest.raises(GGMergeError, match="already finished or aborted"):
        w.add("c", torch.ones(2))
    with pytest.raises(GGMergeError, match="no tensors"):
        with HFWriter(tmp_path / "empty") as w:
            w.finish({})
    assert not (tmp_path / "empty").exists()
    with pytest.raises(GGMergeError, match="relative paths"):
        with HFWriter(tmp_path / "x") as w:
            w.add("a", torch.ones(2))
            w.finish({}, extra_files={"../escape.txt": "no"})
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "x").exists()


def test_streaming_keeps_one_tensor_in_memory(tmp_path):
    """8 × 32 MiB float32 tensors into one 128 MiB bf16 shard: beyond the caller's tensor the writer
    needs less than one tensor's worth of memory (no shard is held; rounding goes by chunks)."""
    n = 8 * 1024 * 1024
    tensor_mb = n * 4 / 2**20
    t = torch.zeros(n)
    reset_peak()
    before = vm_mb("VmHWM")
    with HFWriter(tmp_path / "big") as w:
        for i in range(8):
            t.fill_(float(i))
            w.add(f"t{i}", t)
        w.finish({})
    growth = vm_mb("VmHWM") - before
    print(f"\n8 tensors of {tensor_mb:.0f} MiB (f32) → {8 * tensor_mb / 2:.0f} MiB bf16 shard, "
          f"peak RSS growth {growth:.1f} MiB")
    assert growth < tensor_mb, growth
    with safe_open(str(tmp_path / "big" / "model.safetensors"), framework="pt") as f:
        assert float(f.get_tensor("t7")[-1]) == 7.0


def test_model_card(tmp_path):
    recipe = "merge_method: task_arithmetic\nbase_model: ./Antler-7B\nmodels:\n  - model: Aratako/Ninja-v1-RP\n"
    card = model_card("Ninja-v1-RP-expressive", recipe,
                      ["Elizezen/Antler-7B", "Aratako/Ninja-v1-RP", "./local/Base", "Aratako/Ninja-v1-RP"],
                      {"Aratako/Ninja-v1-RP/model.safetensors": "1" * 64},
                      {"model.safetensors": "2" * 64})
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == ["Elizezen/Antler-7B", "Aratako/Ninja-v1-RP"]
    assert meta["tags"] == ["merge", "ggmerge"]
    assert "# Ninja-v1-RP-expressive" in body and "- ./local/Base" in body
    assert "```yaml\n" + recipe + "```" in body
    assert yaml.safe_load(body.split("```yaml\n")[1].split("```")[0]) == yaml.safe_load(recipe)
    assert f"| input | `Aratako/Ninja-v1-RP/model.safetensors` | `{'1' * 64}` |" in body
    assert f"| output | `model.safetensors` | `{'2' * 64}` |" in body
    # a recipe containing a fence still renders as one code block
    tricky = model_card("x", "a: |\n  ```\n  b\n  ```\n", [], {}, {})
    assert "````yaml\n" in tricky


def test_announced_layout_writes_the_same_bytes_without_spill(tiny_mistral, tmp_path, monkeypatch):
    """With the layout known in advance each header is written first: the same files, byte for byte,
    and never a spill file to copy; a tensor off the layout is refused and nothing appears."""
    import ggmerge.writers.hf as hf

    src = open_source(tiny_mistral)
    names = src.names()
    limit = max(2 * torch.Size(src.shape(n)).numel() for n in names) + 1
    with HFWriter(tmp_path / "spilled", max_shard_bytes=limit) as w:
        for n in names:
            w.add(n, src.load(n))
        w.finish(src.config())
    copies = []
    monkeypatch.setattr(hf, "_copy_into", lambda *a: copies.append(a))
    layout = [(n, src.shape(n)) for n in names]
    with HFWriter(tmp_path / "planned", max_shard_bytes=limit, layout=layout) as w:
        for n in names:
            w.add_rows(n, src.shape(n), [src.load(n)[:1], src.load(n)[1:]])
        w.finish(src.config())
    assert not copies
    files = sorted(p.name for p in (tmp_path / "spilled").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "planned").iterdir()) and len(files) > 4
    for f in files:
        assert (tmp_path / "spilled" / f).read_bytes() == (tmp_path / "planned" / f).read_bytes(), f
    with pytest.raises(GGMergeError, match="announced layout"):
        with HFWriter(tmp_path / "off", layout=layout) as w:
            w.add(names[1], src.load(names[1]))
    with pytest.raises(GGMergeError, match="not complete"):
        with HFWriter(tmp_path / "short", layout=layout) as w:
            w.add(names[0], src.load(names[0]))
            w.finish(src.config())
    assert not (tmp_path / "off").exists() and not (tmp_path / "short").exists()

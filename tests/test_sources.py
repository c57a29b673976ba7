"""Tensor sources against the real readers: safetensors' own ``safe_open``, libggml's dequantizers,
transformers' parameter shapes, and huggingface_hub's cache layout."""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from models import smollm2_path
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ggmerge.arch import llama
from ggmerge.errors import GGMergeError
from ggmerge.sources import GGUFSource, SafetensorsSource, TensorSource, open_source, resolve_hub_id


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def vm_mb(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS counter here")


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------
# safetensors folders and files
# ------------------------------------------------------------------------------------------------
def test_folder_equals_safe_open(tiny_mistral):
    src = open_source(tiny_mistral)
    assert isinstance(src, SafetensorsSource) and isinstance(src, TensorSource)
    with safe_open(str(tiny_mistral / "model.safetensors"), framework="pt") as ref:
        assert src.names() == list(ref.keys())
        for name in ref.keys():
            expected = ref.get_tensor(name)
            got = src.load(name)
            assert got.dtype == torch.float32 and got.is_contiguous()
            assert src.shape(name) == tuple(expected.shape)
            assert src.dtype(name) == "BF16"
            assert torch.equal(got, expected.float()), name
    assert src.config() == json.loads((tiny_mistral / "config.json").read_text())
    assert src.tokenizer_dir() == tiny_mistral
    # a loaded tensor is the caller's: in-place math must work and must not touch the file
    before = hashlib.sha256((tiny_mistral / "model.safetensors").read_bytes()).hexdigest()
    t = src.load("model.norm.weight")
    t.add_(1.0)
    src.close()
    assert hashlib.sha256((tiny_mistral / "model.safetensors").read_bytes()).hexdigest() == before


def test_sharded_equals_single(tiny_mistral, tiny_mistral_sharded):
    single, sharded = open_source(tiny_mistral), open_source(tiny_mistral_sharded)
    assert sorted(sharded.names()) == sorted(single.names())
    index = json.loads((tiny_mistral_sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3
    for name in single.names():
        assert sharded.shard(name).name == index[name]
        assert sharded.shape(name) == single.shape(name)
        assert torch.equal(sharded.load(name), single.load(name)), name


def test_sharded_without_index_and_via_index_file(tiny_mistral_sharded, tmp_path):
    via_index = open_source(tiny_mistral_sharded / "model.safetensors.index.json")
    assert isinstance(via_index, SafetensorsSource) and via_index.path == tiny_mistral_sharded
    folder = copy_model(tiny_mistral_sharded, tmp_path / "m")
    (folder / "model.safetensors.index.json").unlink()
    src = open_source(folder)
    assert sorted(src.names()) == sorted(via_index.names())


def test_single_file_takes_config_from_its_folder(tiny_mistral, tmp_path):
    src = open_source(tiny_mistral / "model.safetensors")
    assert src.config()["num_key_value_heads"] == 2
    lone = tmp_path / "lone.safetensors"
    shutil.copyfile(tiny_mistral / "model.safetensors", lone)
    src = open_source(lone)
    assert src.tokenizer_dir() is None
    with pytest.raises(GGMergeError, match="config.json"):
        src.config()


def test_float32_storage_and_unknown_tensor(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"model.norm.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "h": torch.tensor([1.5, -2.25], dtype=torch.float16)}, str(f))
    src = open_source(f)
    assert src.dtype("model.norm.weight") == "F32" and src.dtype("h") == "F16"
    assert torch.equal(src.load("model.norm.weight"), torch.arange(6.0).reshape(2, 3))
    assert torch.equal(src.load("h"), torch.tensor([1.5, -2.25]))
    # each load is the caller's own tensor: in-place math on one does not show up in the next
    for name in ("model.norm.weight", "h"):
        first = src.load(name)
        first.mul_(0)
        assert not torch.equal(src.load(name), first), name
    with pytest.raises(GGMergeError, match="did you mean 'model.norm.weight'") as e:
        src.shape("model.norm.weights")
    assert e.value.path == f


def test_duplicate_tensor_in_two_shards(tiny_mistral_sharded, tmp_path):
    folder = copy_model(tiny_mistral_sharded, tmp_path / "dup")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name, home = next(iter(index.items()))
    other = next(f for f in sorted(set(index.values())) if f != home)
    with safe_open(str(folder / other), framework="pt") as g:
        tensors = {k: g.get_tensor(k) for k in g.keys()}
    with safe_open(str(folder / home), framework="pt") as g:
        tensors[name] = g.get_tensor(name)
    save_file(tensors, str(folder / other), metadata={"format": "pt"})
    for drop_index in (False, True):
        if drop_index:
            (folder / "model.safetensors.index.json").unlink()
        with pytest.raises(GGMergeError) as e:
            open_source(folder)
        msg = str(e.value)
        assert "stored twice" in msg and name in msg and home in msg and other in msg


def test_index_names_missing_shard_or_tensor(tiny_mistral_sharded, tmp_path):
    folder = copy_model(tiny_mistral_sharded, tmp_path / "missing_file")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (folder / victim).unlink()
    with pytest.raises(GGMergeError) as e:
        open_source(folder)
    assert victim in str(e.value) and e.value.path == index_path and e.value.tensor is not None

    folder = copy_model(tiny_mistral_sharded, tmp_path / "missing_tensor")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, home = next(iter(index["weight_map"].items()))
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != home)
    index["weight_map"][name] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(GGMergeError) as e:
        open_source(folder)
    assert e.value.tensor == name and wrong in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bad_json"])
def test_malformed_file_is_one_clear_error(tiny_mistral, tmp_path, damage):
    folder = copy_model(tiny_mistral, tmp_path / damage)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if damage == "truncated":
        f.write_bytes(data[: 8 + n + (len(data) - 8 - n) // 2])
    elif damage == "garbage":
        f.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        f.write_bytes(data[:8] + b"[" * n + data[8 + n:])
    # the reference reader rejects these files too (so the case is real)
    with pytest.raises(Exception):
        with safe_open(str(f), framework="pt") as g:
            for k in g.keys():
                g.get_tensor(k)
    with pytest.raises(GGMergeError) as e:
        open_source(folder)
    assert e.value.path == f


def test_pickles_are_refused_never_loaded(tiny_mistral, tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:  # a pickle that creates ``marker`` when loaded
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copyfile(tiny_mistral / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    (folder / "weights.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(GGMergeError, match="pickle") as e:
        open_source(folder)
    assert e.value.path == folder and "pytorch_model.bin" in str(e.value)
    with pytest.raises(GGMergeError, match="pickle"):
        open_source(folder / "weights.pt")
    assert not marker.exists()


def test_loading_one_tensor_reads_only_that_tensor(tmp_path):
    """256 MiB file, one 32 MiB tensor loaded and fully read: peak RSS grows by that tensor's mapped
    pages plus the caller's copy (~2 × 32 MiB), never by the file."""
    n = 8 * 1024 * 1024
    f = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.full((n,), float(i)) for i in range(8)}, str(f))
    size_mb = f.stat().st_size / 2**20
    tensor_mb = n * 4 / 2**20
    src = open_source(f)
    reset_peak()
    before = vm_mb("VmHWM")
    t = src.load("t5")
    assert float(t.min()) == float(t.max()) == 5.0  # touch every byte, without a copy
    growth = vm_mb("VmHWM") - before
    print(f"\nfile {size_mb:.0f} MiB, tensor {tensor_mb:.0f} MiB, peak RSS growth {growth:.1f} MiB")
    assert growth < 2.5 * tensor_mb + 16, growth
    assert growth < size_mb / 2, growth


# ------------------------------------------------------------------------------------------------
# GGUF (the real SmolLM2-135M Q4_1 file)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol() -> GGUFSource:
    src = open_source(smollm2_path())
    assert isinstance(src, GGUFSource)
    yield src
    src.close()


def test_gguf_names_shapes_and_types(smol):
    names = smol.names()
    assert len(names) == 1 + 30 * 9 + 1
    assert "lm_head.weight" not in names  # tied: the file has no output.weight
    assert smol.shape("model.embed_tokens.weight") == (49152, 576)
    assert smol.dtype("model.embed_tokens.weight") == "Q8_0"
    assert smol.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert smol.shape("model.layers.7.mlp.down_proj.weight") == (576, 1536)
    assert smol.dtype("model.layers.7.mlp.down_proj.weight") == "Q4_1"
    assert smol.dtype("model.norm.weight") == "F32"
    for name in names:
        assert llama.hf_to_gguf(name) == smol.gguf_name(name)


def test_gguf_config_matches_transformers_shapes(smol):
    cfg = smol.config()
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert cfg["vocab_size"] == 49152 and cfg["intermediate_size"] == 1536
    assert cfg["tie_word_embeddings"] is True
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert {n: smol.shape(n) for n in smol.names()} == expected


def test_gguf_values_equal_libggml_dequantization(smol):
    """Every tensor type in the file, compared with ggml's own ``to_float`` (through libggml)."""
    pytest.importorskip("llama_cpp")
    from ggmerge.libggml import ref_dequantize

    checked = set()
    for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.3.mlp.up_proj.weight",
                 "model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.29.self_attn.q_proj.weight", "model.layers.3.input_layernorm.weight"]:
        raw = smol._get(name)
        ref = torch.from_numpy(ref_dequantize(np.asarray(raw.data).view(np.uint8), raw.tensor_type)).reshape(smol.shape(name))
        heads = {"q_proj": 9, "k_proj": 3}.get(name.split(".")[-2])
        if heads:  # the file holds llama.cpp's interleaved layout; we must hand out HF's
            ref = llama.unpermute(ref, heads)
        got = smol.load(name)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, ref), name
        checked.add(smol.dtype(name))
    assert checked == {"Q8_0", "Q4_1", "F32"}


def test_gguf_loads_are_independent(smol):
    for name in ("model.norm.weight", "model.layers.1.self_attn.k_proj.weight", "model.embed_tokens.weight"):
        first = smol.load(name)
        first.mul_(0)
        assert not torch.equal(smol.load(name), first), name


def test_gguf_qk_unpermute_is_not_identity(smol):
    name = "model.layers.0.self_attn.q_proj.weight"
    raw = smol._get(name)
    import gguf

    stored = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type).copy())
    assert not torch.equal(smol.load(name), stored)
    assert torch.equal(llama.permute(smol.load(name), 9), stored)


def test_gguf_load_is_lazy(smol):
    reset_peak()
    before = vm_mb("VmHWM")
    t = smol.load("model.layers.5.mlp.down_proj.weight")
    growth = vm_mb("VmHWM") - before
    tensor_mb = t.numel() * 4 / 2**20
    print(f"\nGGUF 98 MiB file, one tensor {tensor_mb:.1f} MiB f32, peak RSS growth {growth:.1f} MiB")
    assert growth < 8 * tensor_mb + 8


def test_gguf_tokenizer_dir_is_temporary(tmp_path):
    src = GGUFSource(smollm2_path())
    d = src.tokenizer_dir()
    assert d is not None and (d / "tokenizer.json").is_file()
    assert src.tokenizer_dir() == d  # built once
    src.close()
    assert not d.exists()
    with pytest.raises(GGMergeError, match="closed"):
        src.load("model.norm.weight")


def _tiny_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, object]]) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.attention.head_count", 2)
    for name, (data, qtype) in tensors.items():
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_unsupported_arch_and_type(tmp_path):
    import gguf

    f = _tiny_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": (np.zeros((4, 32), np.float32), None)})
    with pytest.raises(GGMergeError, match="unsupported GGUF architecture 'gpt2'") as e:
        open_source(f)
    assert e.value.path == f
    # Q8_K is a valid ggml type that gguf-py cannot dequantize
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    raw = np.zeros((4, size), np.uint8)
    f = _tiny_gguf(tmp_path / "q8k.gguf", "llama",
                   {"blk.0.ffn_up.weight": (raw, gguf.GGMLQuantizationType.Q8_K)})
    with pytest.raises(GGMergeError, match="Q8_K") as e:
        open_source(f)
    assert e.value.tensor == "blk.0.ffn_up.weight"
    f = _tiny_gguf(tmp_path / "odd.gguf", "llama", {"blk.0.something.weight": (np.zeros(4, np.float32), None)})
    with pytest.raises(GGMergeError, match="no Hugging Face counterpart"):
        open_source(f)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(GGMergeError) as e:
        open_source(bad)
    assert e.value.path == bad


# ------------------------------------------------------------------------------------------------
# Hub ids through a real huggingface_hub cache layout
# ------------------------------------------------------------------------------------------------
def _fake_cache(root: Path, repo: str, model: Path, commit: str = "a" * 40) -> Path:
    """models--org--name/{blobs,refs/main,snapshots/<commit>} as huggingface_hub lays it out."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo_dir / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def test_hub_id_resolves_from_cache_offline(tiny_mistral, tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    snap = _fake_cache(cache, "Aratako/Ninja-v1-RP", tiny_mistral)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert resolve_hub_id("Aratako/Ninja-v1-RP") == snap
    assert resolve_hub_id("Aratako/Ninja-v1-RP@" + "a" * 40) == snap
    src = open_source("Aratako/Ninja-v1-RP")
    assert isinstance(src, SafetensorsSource) and src.path == snap
    ref = open_source(tiny_mistral)
    assert src.names() == ref.names()
    assert torch.equal(src.load("lm_head.weight"), ref.load("lm_head.weight"))
    # HF_HUB_CACHE wins over HF_HOME
    other = tmp_path / "elsewhere"
    _fake_cache(other, "Aratako/Ninja-v1-RP", tiny_mistral, commit="b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve_hub_id("Aratako/Ninja-v1-RP").name == "b" * 40


def test_missing_hub_id_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GGMergeError, match="'Aratako/Ninja-v1-RP'.*not in the local Hugging Face cache"):
        open_source("Aratako/Ninja-v1-RP")
    with pytest.raises(GGMergeError, match="revision 'v2'"):
        open_source("Aratako/Ninja-v1-RP@v2")
    with pytest.raises(GGMergeError, match="no such file or folder"):
        open_source("./not/here")


def test_hub_snapshot_with_only_pickles_is_refused(tmp_path, monkeypatch):
    model = tmp_path / "pk"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    _fake_cache(tmp_path / "hub", "org/pickled", model)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GGMergeError, match="pickle"):
        open_source("org/pickled")

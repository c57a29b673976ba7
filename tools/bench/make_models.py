"""Deterministic Mistral-architecture stand-ins for the seed's eight models, written like real checkpoints.

The seed job (Ninja-v1-RP-expressive) merges eight Mistral-7B-family models. For benchmarking we need the
same *shape of work* at a size this 2-core machine can run several times: one base model and seven
"fine-tunes" of it (base + a small seeded delta), each a folder with bf16 safetensors split into shards
plus ``model.safetensors.index.json``, ``config.json``, ``generation_config.json`` and the real Mistral v1
SentencePiece tokenizer (mistral-common's ``tokenizer.model.v1``; ``tokenizer_config.json`` in the form
transformers 5 loads correctly, see NOTES.md, and the ``tokenizer.json`` a real Mistral repo also ships).

Nothing instantiates a transformers model: each tensor is drawn, rounded to bf16 and written straight
into its place in every role's shard files, so generating the ~1B size needs memory for a few tensors,
not for eight models. Values depend only on (size, role, tensor name), never on generation order.

    python tools/bench/make_models.py --size quick --out /tmp/ggmerge-bench/quick/models
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bench.models")


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SIZES = {
    # ~66M parameters: big enough that per-tensor work dominates start-up, small enough for many runs
    "quick": Size(hidden=512, layers=12, heads=8, kv_heads=2, intermediate=1408),
    # ~0.85B parameters: Mistral's proportions (GQA 4:1, head_dim 128, SwiGLU ~2.75x) at 1/7 the depth
    "1b": Size(hidden=2048, layers=16, heads=16, kv_heads=4, intermediate=5632),
    # a few MB, for testing this harness itself
    "tiny": Size(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256),
}


@dataclass(frozen=True)
class Role:
    dirname: str
    seed: int
    delta: float      # delta std relative to the base tensor's std (0 = the base itself)
    shards: int       # how many safetensors files, like the real repos (2-3, one with many small ones)


#: the seed's eight models (Ninja-v1-RP-expressive model card), all descendants of Mistral-7B-v0.1
ROLES = [
    Role("Mistral-7B-v0.1", 0, 0.0, 2),
    Role("Mistral-7B-Instruct-v0.2", 1, 0.02, 3),
    Role("Antler-7B", 2, 0.04, 2),              # continued pre-training on Japanese novels: the biggest delta
    Role("WestLake-7B-v2", 3, 0.02, 3),
    Role("Kunoichi-DPO-v2-7B", 4, 0.02, 2),
    Role("Silicon-Maid-7B", 5, 0.02, 8),
    Role("Loyal-Macaroni-Maid-7B", 6, 0.02, 3),
    Role("Ninja-v1-RP", 7, 0.03, 3),
]
BASE, INSTRUCT, ANTLER, RP_MODELS, NINJA = (ROLES[0].dirname, ROLES[1].dirname, ROLES[2].dirname,
                                            [r.dirname for r in ROLES[3:7]], ROLES[7].dirname)


def tensor_layout(s: Size) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes in ``state_dict`` order (what MistralForCausalLM has)."""
    kv = s.kv_heads * s.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (s.hidden, s.hidden)),
            (p + "self_attn.k_proj.weight", (kv, s.hidden)),
            (p + "self_attn.v_proj.weight", (kv, s.hidden)),
            (p + "self_attn.o_proj.weight", (s.hidden, s.hidden)),
            (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
        ]
    out += [("model.norm.weight", (s.hidden,)), ("lm_head.weight", (s.vocab, s.hidden))]
    return out


def n_params(s: Size) -> int:
    return sum(int(np.prod(shape)) for _, shape in tensor_layout(s))


def config_json(s: Size) -> dict:
    """config.json as a Mistral-7B-v0.1 checkpoint has it (scaled down)."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": 32768,
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": s.vocab,
    }


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------

def _rng(*key) -> np.random.Generator:
    """A generator seeded by a stable hash of ``key`` (Python's hash() is salted per process)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def base_tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 base values scaled like a trained model's: activations stay O(1) through the layers."""
    g = _rng("base", name)
    x = g.standard_normal(shape, dtype=np.float32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * x
    if name == "model.embed_tokens.weight":
        return x * np.float32(0.02)
    gain = 3.0 if name == "lm_head.weight" else 1.0
    return x * np.float32(gain / shape[-1] ** 0.5)


def role_tensor(base: np.ndarray, base_std: float, role: Role, name: str) -> np.ndarray:
    if role.delta == 0.0:
        return base
    noise = _rng("delta", role.seed, name).standard_normal(base.shape, dtype=np.float32)
    noise *= np.float32(role.delta * base_std)
    noise += base
    return noise


def to_bf16_bytes(x: np.ndarray) -> memoryview:
    """Round-to-nearest-even bf16 (torch's cast), as little-endian bytes."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)
    return memoryview(t.view(torch.int16).numpy()).cast("B")


# ----------------------------------------------------------------------------------------------
# streaming sharded safetensors
# ----------------------------------------------------------------------------------------------

def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedWriter:
    """Writes one model's shards with every header laid out up front, then tensors in any order.

    Tensors are split into ``shards`` contiguous groups of about equal bytes (as ``save_pretrained`` does
    with ``max_shard_size``); inside a file the data is in name order, like ``safetensors.save_file``.
    """

    def __init__(self, folder: Path, layout: list[tuple[str, tuple[int, ...]]], shards: int):
        self.folder = folder
        sizes = [int(np.prod(shape)) * 2 for _, shape in layout]
        total = sum(sizes)
        files = shard_names(shards)
        self.where: dict[str, tuple[object, int]] = {}
        self.weight_map: dict[str, str] = {}
        groups: list[list[int]] = [[] for _ in files]
        acc = 0
        for i, nbytes in enumerate(sizes):
            k = min(shards - 1, acc * shards // total)   # by where the tensor starts
            groups[k].append(i)
            acc += nbytes
        if any(not g for g in groups):   # a few huge tensors (tiny sizes): split by count instead
            per = -(-len(layout) // shards)
            groups = [list(range(j, min(j + per, len(layout)))) for j in range(0, len(layout), per)]
        self._files = []
        for fname, idx in zip(files, groups):
            if not idx:
                raise ValueError(f"{fname}: empty shard (too many shards for {len(layout)} tensors)")
            header: dict = {"__metadata__": {"format": "pt"}}
            off = 0
            entries = sorted(idx, key=lambda i: layout[i][0])
            for i in entries:
                name, shape = layout[i]
                header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + sizes[i]]}
                off += sizes[i]
            hb = json.dumps(header, separators=(",", ":")).encode()
            hb += b" " * (-len(hb) % 8)
            f = open(folder / fname, "wb")  # noqa: SIM115 - kept open until close(): tensors arrive in any order
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            f.truncate(8 + len(hb) + off)
            data_start = 8 + len(hb)
            for i in entries:
                name = layout[i][0]
                self.where[name] = (f, data_start + header[name]["data_offsets"][0])
                self.weight_map[name] = fname
            self._files.append(f)
        self.total = total
        self.single = shards == 1

    def write(self, name: str, data: memoryview) -> None:
        f, pos = self.where[name]
        f.seek(pos)
        f.write(data)

    def close(self) -> None:
        for f in self._files:
            f.close()
        if not self.single:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------

def spm_v1_path() -> Path:
    """mistral-common's real Mistral-7B v0.1 SentencePiece model (32000 pieces), found without importing it."""
    from ggmerge.miniature import spm_v1

    return spm_v1()




def tokenizer_files(cache: Path) -> Path:
    """A folder with tokenizer.model, tokenizer_config.json, special_tokens_map.json and tokenizer.json.

    tokenizer.json is what transformers converts the SentencePiece model to; real Mistral repos ship it,
    and with it mergekit's union tokenizer loads without re-converting for every model.
    """
    done = cache / ".complete"
    if done.is_file():
        return cache
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    from ggmerge.miniature import write_tokenizer

    write_tokenizer(cache, model_max_length=32768)
    (cache / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cache))
    tmp = cache / "_saved"
    tok.save_pretrained(str(tmp))
    shutil.move(str(tmp / "tokenizer.json"), str(cache / "tokenizer.json"))
    shutil.rmtree(tmp)
    done.write_text("ok\n")
    return cache


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------

def spec_stamp(size_name: str) -> str:
    spec = {"size": asdict(SIZES[size_name]), "roles": [asdict(r) for r in ROLES], "format": 2}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def make_models(size_name: str, out: Path, *, force: bool = False) -> dict[str, Path]:
    """Write the eight role folders under ``out`` (skipped when already complete); returns role → folder."""
    size = SIZES[size_name]
    out = Path(out)
    folders = {r.dirname: out / r.dirname for r in ROLES}
    stamp = out / ".complete"
    want = spec_stamp(size_name)
    if not force and stamp.is_file() and stamp.read_text().strip() == want:
        return folders
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = tokenizer_files(out.parent / "_tokenizer")
    layout = tensor_layout(size)
    log.info("generating 8 models of %.1fM parameters (%s) in %s", n_params(size) / 1e6, size_name, out)
    writers = {}
    for r in ROLES:
        folder = folders[r.dirname]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config_json(size), indent=2) + "\n")
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
            shutil.copyfile(tok / f, folder / f)
        writers[r.dirname] = ShardedWriter(folder, layout, r.shards)
    try:
        for k, (name, shape) in enumerate(layout):
            base = base_tensor(name, shape)
            std = float(base.std()) if not name.endswith("norm.weight") else 0.1
            for r in ROLES:
                writers[r.dirname].write(name, to_bf16_bytes(role_tensor(base, std, r, name)))
            if k % 20 == 0:
                log.info("  %d/%d %s", k + 1, len(layout), name)
    finally:
        for w in writers.values():
            w.close()
    stamp.write_text(want + "\n")
    return folders


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="quick")
    ap.add_argument("--out", type=Path, help="folder for the eight models (default /tmp/ggmerge-bench/SIZE/models)")
    ap.add_argument("--force", action="store_true", help="regenerate even if complete")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or Path("/tmp/ggmerge-bench") / args.size / "models"
    folders = make_models(args.size, out, force=args.force)
    log.info("%d models, %.1fM parameters each, in %s", len(folders), n_params(SIZES[args.size]) / 1e6, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

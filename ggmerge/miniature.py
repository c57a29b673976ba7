"""A miniature of the seed's lineage: deterministic tiny Mistral models named after its eight roles.

The bundled example (``examples/ninja-mini``) merges these exactly as the seed merges the real 7B
models, so a fresh machine can run ``ggmerge build && ggmerge quantize q4_k_m`` with no downloads.
They carry the real Mistral-7B v0.1 SentencePiece vocabulary (shipped by ``mistral-common``), so the
tokenizer, chat template and GGUF vocabulary paths are the real ones; only the weights are random.
Related models are a shared random base plus small seeded deltas, like fine-tunes of one model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import GGMergeError

log = logging.getLogger(__name__)

#: role name → (parent role or None, seed label). The 7B names are the seed's Hub ids, shortened.
ROLES = {
    "Mistral-7B-v0.1": None,
    "Mistral-7B-Instruct-v0.2": "Mistral-7B-v0.1",
    "Antler-7B": "Mistral-7B-v0.1",
    "WestLake-7B-v2": "Mistral-7B-v0.1",
    "Kunoichi-DPO-v2-7B": "Mistral-7B-v0.1",
    "Silicon-Maid-7B": "Mistral-7B-v0.1",
    "Loyal-Macaroni-Maid-7B": "Mistral-7B-v0.1",
    "Ninja-v1-RP": "Mistral-7B-v0.1",
}

#: tiny but quantizable dims: every row length is a multiple of 256 (K-quant super-block size)
DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=32000)

MISTRAL_INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def spm_v1() -> Path:
    """The real Mistral-7B v0.1 ``tokenizer.model`` shipped inside the mistral-common package
    (located without importing it: its import is slow and we only need the file)."""
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise GGMergeError("the miniature example needs the 'mistral-common' package for its real "
                           "Mistral vocabulary: pip install mistral-common")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    if not p.is_file():
        raise GGMergeError("mistral-common does not ship tokenizer.model.v1 here", path=p)
    return p


def config(**overrides) -> dict:
    cfg = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "head_dim": None,
        "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
    }
    cfg.update(DIMS)
    cfg.update(overrides)
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def _gen(label: str) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


def weights(role: str, cfg: dict, *, delta_scale: float = 0.25) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights of ``role``: the root's random init, plus a seeded delta per descendant."""
    parent = ROLES.get(role)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        g = _gen(f"root/{name}")
        if len(shape) == 1:
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) * (1.0 / shape[1] ** 0.5)
        if parent is not None:
            d = torch.randn(shape, generator=_gen(f"{role}/{name}"))
            w = w + delta_scale * d * (0.1 if len(shape) == 1 else 1.0 / shape[1] ** 0.5)
        out[name] = w
    return out


def write_model(folder: Path, role: str, cfg: dict | None = None, *, chat_template: str | None = None) -> None:
    from safetensors.torch import save_file

    cfg = cfg or config()
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in weights(role, cfg).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        write_tokenizer(tmp, chat_template=chat_template)


def write_tokenizer(folder: Path, *, spm_path: Path | None = None, chat_template: str | None = None,
                    legacy: bool = False, model_max_length: int = 4096) -> Path:
    """``tokenizer.model`` + ``tokenizer_config.json`` in the form transformers 5 loads correctly.

    A bare ``LlamaTokenizer(vocab_file=...)`` silently yields a 3-token tokenizer in transformers 5; a folder with
    tokenizer_class LlamaTokenizer and the special tokens, loaded through AutoTokenizer, reproduces
    sentencepiece's ids. ``legacy`` only changes text right after a special token such as ``</s>``:
    True puts a "▁" there (what llama.cpp's SentencePiece tokenizer always does), False does not.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spm_path or spm_v1(), folder / "tokenizer.model")
    tok = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length, "sp_model_kwargs": {},
    }
    if chat_template:
        tok["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")
    return folder


def ensure_lineage(folder: str | Path) -> list[Path]:
    """Create the eight miniature models under ``folder`` (skipping those already there)."""
    folder = Path(folder)
    made = []
    for role in ROLES:
        dst = folder / role
        if (dst / "model.safetensors").is_file():
            continue
        log.info("creating miniature model %s", dst)
        write_model(dst, role, chat_template=MISTRAL_INST_TEMPLATE if "Instruct" in role else None)
        made.append(dst)
    return made

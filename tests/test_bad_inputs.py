"""The bad-input corpus: every way a user or a stranger's file can be wrong, through the real CLI.

Each case builds its broken input in the test's tmp dir, runs ``ggmerge.cli.main([...])`` in this
process (no mocks), and checks the bar of issue 7:

* a non-zero exit (1 for errors) and no exception escaping ``main`` (that would be a traceback);
* exactly one ``ggmerge: error:`` line on stderr, one line long, containing the expected message and
  naming the file (and the tensor or key where there is one);
* nothing at the final output path and no ``*.ggmerge-partial`` left beside it; an output that
  existed before is untouched.

A case marked ``isolate`` runs the same ``main([...])`` call in a child process under a memory limit
and a timeout, because the code it exercises may loop or allocate without bound (and must not take
the test run down with it).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import badinputs as B
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ggmerge.atomic import TMP_SUFFIX
from ggmerge.cli import main
from ggmerge.errors import GGMergeError

TESTS = Path(__file__).parent
REPO = TESTS.parent


# --------------------------------------------------------------------------------------------------
# running the CLI and checking the bar
# --------------------------------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the watchdog; a BaseException so ``main``'s handlers cannot swallow it."""


@dataclass
class Outcome:
    code: int | None
    out: str
    err: str
    escaped: str | None = None      # "TypeError: ..." when an exception left main()


def run_inprocess(argv: list[str], capsys, timeout: float = 60) -> Outcome:
    def on_alarm(signum, frame):
        raise Hang(f"no answer after {timeout} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    escaped = None
    code = None
    try:
        code = main(argv)
    except Hang as exc:
        escaped = f"hang: {exc}"
    except SystemExit as exc:  # argparse
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - anything else would be a traceback for the user
        escaped = f"{type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    cap = capsys.readouterr()
    return Outcome(code, cap.out, cap.err, escaped)


#: run ``main(argv)`` in a child; report an escaped exception the same way as in-process
_CHILD = r"""
import json, resource, signal, sys, traceback
limit = int(sys.argv[1]); timeout = int(sys.argv[2]); argv = json.loads(sys.argv[3])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
def on_alarm(s, f):
    sys.stderr.write("\nESCAPED hang: no answer after %d s\n" % timeout); sys.stderr.flush()
    import os; os._exit(97)
signal.signal(signal.SIGALRM, on_alarm); signal.alarm(timeout)
from ggmerge.cli import main
try:
    code = main(argv)
except SystemExit as e:
    code = e.code
except BaseException as e:
    sys.stderr.write("\nESCAPED %s: %s\n" % (type(e).__name__, e)); sys.stderr.flush()
    code = 98
sys.exit(code)
"""


def run_isolated(argv: list[str], *, mem_bytes: int = 2 << 30, timeout: int = 60, env=None,
                 preexec=None) -> Outcome:
    """``main(argv)`` in a child process under RLIMIT_AS and a watchdog."""
    def pre():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec:
            preexec()

    p = subprocess.run([sys.executable, "-c", _CHILD, str(mem_bytes), str(timeout), json.dumps(argv)],
                       capture_output=True, text=True, timeout=timeout + 60, cwd=REPO,
                       env=env, preexec_fn=pre, check=False)
    escaped = None
    for line in p.stderr.splitlines():
        if line.startswith("ESCAPED "):
            escaped = line[len("ESCAPED "):]
    if p.returncode < 0:
        escaped = f"killed by signal {-p.returncode}"
    return Outcome(p.returncode, p.stdout, p.stderr, escaped)


@dataclass
class Expect:
    argv: list[str]
    message: str                                   # exact substring of the error line
    names: tuple[str, ...] = ()                    # file / tensor / key names the line must contain
    outputs: tuple[Path, ...] = ()                 # final paths that must not appear
    unchanged: dict[Path, bytes] = field(default_factory=dict)   # existing outputs that must survive
    code: int = 1
    isolate: bool = False


def check(exp: Expect, res: Outcome) -> None:
    problems = []
    if res.escaped:
        problems.append(f"an exception escaped main() (the user sees a traceback): {res.escaped}")
    if "Traceback (most recent call last)" in res.err + res.out:
        problems.append("a traceback was printed without --debug")
    if res.code != exp.code:
        problems.append(f"exit code {res.code}, expected {exp.code}")
    lines = [ln for ln in res.err.splitlines() if ln.startswith("ggmerge: error:")]
    if len(lines) != 1:
        problems.append(f"expected exactly one 'ggmerge: error:' line on stderr, got {len(lines)}")
    else:
        line = lines[0]
        if exp.message.lower() not in line.lower():
            problems.append(f"message lacks {exp.message!r}")
        for n in exp.names:
            if n not in line:
                problems.append(f"message does not name {n!r}")
    for out in exp.outputs:
        if out.exists():
            problems.append(f"something was left at the final output path {out}")
        if out.parent.is_dir():
            left = [p.name for p in out.parent.iterdir() if p.name.endswith(TMP_SUFFIX)]
            if left:
                problems.append(f"temporary output left behind: {left}")
    for path, content in exp.unchanged.items():
        if not path.is_file() or path.read_bytes() != content:
            problems.append(f"the existing {path} was changed or removed")
    if problems:
        shown = "\n".join(res.err.strip().splitlines()[-6:])
        pytest.fail("; ".join(problems) + f"\n--- stderr (last lines) ---\n{shown}", pytrace=False)


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------

class Env:
    def __init__(self, tmp: Path, family: dict[str, Path]):
        self.tmp = tmp
        self.fam = family

    def recipe(self, text: str, folder: str = "r") -> Path:
        text = text.replace("BASE", str(self.fam["base"])).replace("FT1", str(self.fam["ft1"]))
        text = text.replace("FT2", str(self.fam["ft2"]))
        return B.write_recipe(self.tmp / folder, text)

    def build(self, text: str, **kw) -> Expect:
        r = self.recipe(text)
        out = self.tmp / "merged"
        return Expect(["build", str(r), "-o", str(out)], outputs=(out,), **kw)

    def variant(self, name: str, *, drop: str | None = None, replace: dict | None = None,
                config: dict | None = None, src: str = "ft1") -> Path:
        """A copy of a family model with a tensor dropped/replaced or config.json edited."""
        dst = self.tmp / name
        shutil.copytree(self.fam[src], dst)
        if drop or replace:
            f = dst / "model.safetensors"
            t = load_file(str(f))
            if drop:
                del t[drop]
            for k, v in (replace or {}).items():
                t[k] = v
            save_file(t, str(f), metadata={"format": "pt"})
        if config:
            cfg = json.loads((dst / "config.json").read_text())
            cfg.update(config)
            (dst / "config.json").write_text(json.dumps(cfg))
        return dst

    def gguf(self, name: str = "in.gguf", build: B.GGUFBuild | None = None) -> Path:
        return (build or B.tiny_llama_gguf()).write(self.tmp / name)

    def raw(self, name: str, data: bytes) -> Path:
        p = self.tmp / name
        p.write_bytes(data)
        return p


CASES: dict = {}


def case(fn):
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


DARE = """merge_method: dare_ties
base_model: BASE
models:
  - model: FT1
    parameters: {weight: 0.5, density: 0.5}
dtype: bfloat16
"""

# --- the recipe ----------------------------------------------------------------------------------


@case
def case_yaml_bad_indentation(env):
    e = env.build("merge_method: linear\nmodels:\n  - model: BASE\n   parameters: {weight: 1}\n",
                  message="invalid YAML")
    e.names = ("ggmerge.yaml:4",)
    return e


@case
def case_yaml_unclosed_bracket(env):
    return env.build("merge_method: linear\nmodels: [BASE, FT1\n", message="invalid YAML",
                     names=("ggmerge.yaml",))


@case
def case_yaml_duplicate_key(env):
    return env.build("merge_method: linear\nmerge_method: ties\nmodels: [BASE]\n",
                     message="duplicate key 'merge_method'", names=("ggmerge.yaml:2",))


@case
def case_yaml_not_a_mapping(env):
    return env.build("- BASE\n- FT1\n", message="must be a mapping", names=("ggmerge.yaml",))


@case
def case_recipe_empty(env):
    return env.build("# nothing here\n", message="recipe is empty", names=("ggmerge.yaml",))


@case
def case_recipe_missing(env):
    r = env.tmp / "nowhere" / "ggmerge.yaml"
    return Expect(["build", str(r)], message="recipe file not found", names=(str(r),))


@case
def case_unknown_method(env):
    return env.build(DARE.replace("dare_ties", "dare_tie"),
                     message="unknown merge_method 'dare_tie' (did you mean 'dare_ties'?)",
                     names=("ggmerge.yaml:1", "key 'merge_method'"))


def _strict(exp: Expect) -> Expect:
    exp.argv.append("--strict")
    return exp


# unknown keys and parameters are ignored with a warning, as mergekit ignores them; --strict refuses them
@case
def case_unknown_key(env):
    return _strict(env.build(DARE.replace("base_model:", "base_modle:"),
                             message="unknown key 'base_modle' in the recipe (did you mean 'base_model'?)",
                             names=("ggmerge.yaml:2",)))


@case
def case_unknown_key_lenient_names_the_typo(env):
    # without --strict the typo is ignored (a warning), the recipe then lacks its base: the error says why
    return env.build(DARE.replace("base_model:", "base_modle:"),
                     message="merge_method 'dare_ties' needs a 'base_model' (ignored: 'base_modle' at line 2 "
                             "(did you mean 'base_model'?))", names=("ggmerge.yaml:1",))


@case
def case_unknown_parameter(env):
    return _strict(env.build(DARE.replace("density:", "densty:"),
                             message="unknown parameter 'densty' for merge_method 'dare_ties' (did you mean "
                                     "'density'?)", names=("ggmerge.yaml:5", "key 'densty'")))


@case
def case_unknown_key_in_model_entry(env):
    return _strict(env.build(DARE.replace("    parameters:", "    paramters:"),
                             message="unknown key 'paramters' in a model entry (did you mean 'parameters'?)",
                             names=("ggmerge.yaml:5",)))


@case
def case_strict_reports_every_ignored_key(env):
    text = DARE.replace("dtype:", "dype:").replace("  - model: FT1\n", "  - model: FT1\n    revision: main\n")
    return _strict(env.build(text, message="unknown key 'revision' in a model entry (to pin a revision, write it "
                                           "into the reference: 'model: org/name@REVISION') (and 1 more problem(s)",
                             names=("ggmerge.yaml:5", "key 'revision'")))


@case
def case_mergekit_method_not_supported_yet(env):
    return env.build(DARE.replace("dare_ties", "sce"),
                     message="merge_method 'sce' is a mergekit method ggmerge does not support yet (ggmerge "
                             "supports: linear, task_arithmetic,", names=("ggmerge.yaml:1", "key 'merge_method'"))


@case
def case_modules_not_supported_yet(env):
    return env.build("merge_method: linear\nmodules:\n  text: {models: [{model: BASE}]}\n",
                     message="'modules' (mergekit's multi-module merges) is not supported yet",
                     names=("ggmerge.yaml:2", "key 'modules'"))


@case
def case_unknown_chat_template(env):
    # found when the recipe is read, so --dry-run fails with the same line
    e = env.build(DARE + "chat_template: chatmlx\n", message="chat template 'chatmlx' is neither a built-in "
                  "name (vicuna, chatml, llama3, alpaca, mistral, exaone, auto), a Jinja string nor a file "
                  "(relative to the recipe) (did you mean 'chatml'?)", names=("ggmerge.yaml:7", "key 'chat_template'"))
    e.argv.append("--dry-run")
    return e


@case
def case_della_epsilon_too_large_for_a_layer(env):
    # a density gradient makes density - epsilon <= 0 only in the first layer: found at plan time, by --dry-run
    text = DARE.replace("dare_ties", "della").replace("density: 0.5", "density: [0.1, 0.5], epsilon: 0.15")
    e = env.build(text, message="della needs 0 < density - epsilon and density + epsilon < 1 (density=0.1, "
                                "epsilon=0.15)", names=("ggmerge.yaml:4", "key 'epsilon'", "stage 'output'"))
    e.argv.append("--dry-run")
    return e


@case
def case_all_range_problems_at_once(env):
    text = DARE.replace("density: 0.5", "density: 1.5").replace("dtype: bfloat16", "parameters: {lambda: .inf}")
    return env.build(text, message="parameter 'density' = 1.5 is out of range (0.0, 1.0] (and 1 more problem(s), "
                                   "listed above)", names=("ggmerge.yaml:5", "key 'density'"))


@case
def case_density_above_one(env):
    return env.build(DARE.replace("density: 0.5", "density: 1.5"),
                     message="parameter 'density' = 1.5 is out of range (0.0, 1.0]",
                     names=("ggmerge.yaml:5", "key 'density'"))


@case
def case_density_zero(env):
    return env.build(DARE.replace("density: 0.5", "density: 0"),
                     message="parameter 'density' = 0 is out of range (0.0, 1.0]", names=("key 'density'",))


@case
def case_slerp_t_out_of_range(env):
    return env.build("merge_method: slerp\nbase_model: BASE\nmodels: [BASE, FT1]\nparameters: {t: 2}\n",
                     message="parameter 't' = 2 is out of range [0.0, 1.0]", names=("key 't'",))


@case
def case_weight_not_finite(env):
    return env.build(DARE.replace("weight: 0.5", "weight: .nan"), message="must be finite",
                     names=("key 'weight'",))


@case
def case_weight_not_a_number(env):
    return env.build(DARE.replace("weight: 0.5", "weight: heavy"), message="weight",
                     names=("ggmerge.yaml", "'heavy'"))


@case
def case_missing_merge_method(env):
    return env.build("models: [BASE, FT1]\n", message="missing 'merge_method'", names=("ggmerge.yaml",))


@case
def case_method_needs_base(env):
    return env.build(DARE.replace("base_model: BASE\n", ""), message="merge_method 'dare_ties' needs a 'base_model'",
                     names=("ggmerge.yaml",))


@case
def case_models_and_slices(env):
    return env.build(DARE + "slices:\n  - sources: [{model: BASE, layer_range: [0, 2]}]\n",
                     message="exactly one of 'models' or 'slices' must be given", names=("ggmerge.yaml",))


@case
def case_stage_cycle(env):
    text = ("name: a\nmerge_method: task_arithmetic\nbase_model: BASE\nmodels:\n  - model: ./b\n"
            "    parameters: {weight: 1}\n---\n"
            "name: b\nmerge_method: task_arithmetic\nbase_model: BASE\nmodels:\n  - model: ./a\n"
            "    parameters: {weight: 1}\n---\n"
            "merge_method: linear\nmodels:\n  - model: ./a\n    parameters: {weight: 1}\n")
    return env.build(text, message="stage cycle: output -> a -> b -> a", names=("ggmerge.yaml",))


@case
def case_stage_reference_typo(env):
    # a stage named 'chatvec1', referenced as './chatvec-1': no such stage, no such folder
    text = ("name: chatvec1\nmerge_method: task_arithmetic\nbase_model: BASE\nmodels:\n  - model: FT1\n"
            "    parameters: {weight: 1}\n---\n"
            "merge_method: linear\nmodels:\n  - model: ./chatvec-1\n    parameters: {weight: 1}\n")
    return env.build(text, message="did you mean 'chatvec1'", names=("chatvec-1",))


@case
def case_two_output_documents(env):
    return env.build(DARE + "---\n" + DARE, message="more than one document has no 'name:'",
                     names=("ggmerge.yaml",))


@case
def case_layer_range_past_end(env):
    text = ("merge_method: passthrough\nslices:\n  - sources:\n      - model: BASE\n"
            "        layer_range: [0, 5]\n")
    return env.build(text, message="goes past the model's layers", names=(env.fam["base"].name,))


@case
def case_seed_not_integer(env):
    return env.build(DARE + "ggmerge:\n  seed: lucky\n", message="seed must be an integer",
                     names=("key 'seed'",))


@case
def case_lora_reference(env):
    return env.build(DARE.replace("model: FT1", "model: FT1+some/lora"), message="LoRA",
                     names=("ggmerge.yaml",))


# --- the models a recipe names -------------------------------------------------------------------


@case
def case_missing_model_folder(env):
    return env.build(DARE.replace("FT1", str(env.tmp / "no-such-model")),
                     message="no such file or folder", names=("no-such-model",))


@case
def case_missing_hub_model(env):
    return env.build(DARE.replace("FT1", "someorg/not-downloaded"),
                     message="is not in the local Hugging Face cache", names=("someorg/not-downloaded",))


@case
def case_missing_tensor(env):
    m = env.variant("ft-missing", drop="model.layers.1.mlp.down_proj.weight")
    return env.build(DARE.replace("FT1", str(m)), message="missing tensor",
                     names=("ft-missing", "tensor 'model.layers.1.mlp.down_proj.weight'"))


@case
def case_shape_mismatch(env):
    w = load_file(str(env.fam["ft1"] / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    m = env.variant("ft-shape", replace={"model.layers.0.mlp.up_proj.weight": w[:96].contiguous()})
    return env.build(DARE.replace("FT1", str(m)), message="shape mismatch",
                     names=("ft-shape", "tensor 'model.layers.0.mlp.up_proj.weight'", "[96, 64]"))


@case
def case_vocab_size_mismatch(env):
    t = load_file(str(env.fam["ft1"] / "model.safetensors"))
    pad = {k: torch.cat([t[k], t[k][:2]]) for k in ("model.embed_tokens.weight", "lm_head.weight")}
    m = env.variant("ft-vocab", replace=pad, config={"vocab_size": 32002})
    return env.build(DARE.replace("FT1", str(m)), message="vocabulary sizes differ",
                     names=("ft-vocab", "tokenizer_source", "32002"))


@case
def case_unsupported_architecture(env):
    m = env.variant("ft-falcon", config={"architectures": ["FalconForCausalLM"], "model_type": "falcon"})
    return env.build(DARE.replace("FT1", str(m)), message="is not supported",
                     names=("ft-falcon", "FalconForCausalLM"))


@case
def case_architectures_mixed_in_one_stage(env):
    m = env.variant("ft-qwen", config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    return env.build(DARE.replace("FT1", str(m)), message="models of one architecture only",
                     names=("ft-qwen", "qwen2", "llama"))


@case
def case_pickle_only_model(env):
    d = env.tmp / "pickled"
    d.mkdir()
    shutil.copy(env.fam["ft1"] / "config.json", d)
    # a real pickle that would run code if loaded; it must never be opened
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch PWNED'\ntR.")
    e = env.build(DARE.replace("FT1", str(d)), message="never unpickles", names=("pickled", "pytorch_model.bin"))
    return e


@case
def case_folder_without_weights(env):
    d = env.tmp / "just-config"
    d.mkdir()
    shutil.copy(env.fam["ft1"] / "config.json", d)
    return env.build(DARE.replace("FT1", str(d)), message="is not a model folder", names=("just-config",))


@case
def case_config_not_json(env):
    m = env.variant("ft-badcfg")
    (m / "config.json").write_text("{ this is not json")
    return env.build(DARE.replace("FT1", str(m)), message="config.json", names=("ft-badcfg",))


@case
def case_nan_in_weights(env):
    w = load_file(str(env.fam["ft1"] / "model.safetensors"))["model.norm.weight"].clone()
    w[3] = float("nan")
    m = env.variant("ft-nan", replace={"model.norm.weight": w})
    return env.build(DARE.replace("FT1", str(m)), message="NaN",
                     names=("ft-nan", "tensor 'model.norm.weight'"))


@case
def case_tokenizer_model_does_not_parse(env):
    m = env.variant("ft-badspm", src="base")
    (m / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff\xff\x0fnot a sentencepiece model" * 3)
    (m / "tokenizer.json").unlink(missing_ok=True)
    return env.build(DARE.replace("BASE", str(m)), message="tokenizer.model",
                     names=("ft-badspm",))


# --- safetensors files that lie or are cut ------------------------------------------------------------


def _st_model(env, name: str, data: bytes) -> Path:
    """A copy of ft1 whose model.safetensors is replaced by ``data``."""
    m = env.variant(name)
    (m / "model.safetensors").write_bytes(data)
    return m


@case
def case_safetensors_truncated_data(env):
    full = (env.fam["ft1"] / "model.safetensors").read_bytes()
    m = _st_model(env, "st-cut", full[: len(full) - 1000])
    return env.build(DARE.replace("FT1", str(m)), message="truncated", names=("st-cut", "model.safetensors"))


@case
def case_safetensors_shorter_than_length_field(env):
    m = _st_model(env, "st-tiny", b"\x10\x00\x00")
    return env.build(DARE.replace("FT1", str(m)), message="8-byte header length",
                     names=("st-tiny", "model.safetensors"))


@case
def case_safetensors_header_length_lies(env):
    h, d = B.tiny_safetensors()
    m = _st_model(env, "st-len", B.safetensors_bytes(h, d, length=1 << 40))
    return env.build(DARE.replace("FT1", str(m)), message="does not fit", names=("st-len", "model.safetensors"))


@case
def case_safetensors_header_not_json(env):
    m = _st_model(env, "st-json", B.safetensors_bytes(b'{"model.norm.weight": {"dtype": "F32", ', b""))
    return env.build(DARE.replace("FT1", str(m)), message="header is not JSON", names=("st-json",))


@case
def case_safetensors_offsets_beyond_file(env):
    m = env.variant("st-offs")
    f = m / "model.safetensors"

    def lie(h):
        b, e = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [b, e + 10_000_000]
    B.rewrite_safetensors(f, lie)
    return env.build(DARE.replace("FT1", str(m)), message="lies beyond the end",
                     names=("st-offs", "tensor 'model.norm.weight'"))


@case
def case_safetensors_dtype_lies(env):
    # says F32 where the bytes are BF16: the span is half what the shape needs
    m = env.variant("st-dtype")
    B.rewrite_safetensors(m / "model.safetensors",
                          lambda h: h["model.layers.0.input_layernorm.weight"].update(dtype="F32"))
    return env.build(DARE.replace("FT1", str(m)), message="does not match the data",
                     names=("st-dtype", "tensor 'model.layers.0.input_layernorm.weight'"))


@case
def case_safetensors_unknown_dtype(env):
    m = env.variant("st-q9")
    B.rewrite_safetensors(m / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="Q9"))
    return env.build(DARE.replace("FT1", str(m)), message="unknown dtype 'Q9'",
                     names=("st-q9", "tensor 'model.norm.weight'"))


@case
def case_safetensors_negative_shape(env):
    m = env.variant("st-neg")
    B.rewrite_safetensors(m / "model.safetensors", lambda h: h["model.norm.weight"].update(shape=[-64]))
    # a corrupt header, not a model of another shape: the message must say so
    return env.build(DARE.replace("FT1", str(m)), message="non-negative integers",
                     names=("st-neg", "tensor 'model.norm.weight'"))


@case
def case_safetensors_shape_lies(env):
    # the shape says 32 rows where the data holds 64: the plan must not trust it
    m = env.variant("st-shape")
    B.rewrite_safetensors(m / "model.safetensors",
                          lambda h: h["model.layers.0.mlp.down_proj.weight"].update(shape=[32, 128]))
    return env.build(DARE.replace("FT1", str(m)), message="does not match the data",
                     names=("st-shape", "tensor 'model.layers.0.mlp.down_proj.weight'"))


# --- GGUF files that lie or are cut (read by quantize, convert and inspect) ----------------------------


def _gguf_case(env, verb: str, build: B.GGUFBuild | bytes, message: str, names=(), isolate=False):
    src = env.raw("hostile.gguf", build if isinstance(build, bytes) else build.to_bytes()[0])
    if verb == "quantize":
        out = env.tmp / "out.Q8_0.gguf"
        argv = ["quantize", "q8_0", str(src), "-o", str(out)]
    elif verb == "convert":
        out = env.tmp / "out-hf"
        argv = ["convert", str(src), "-o", str(out)]
    else:
        out = env.tmp / "nothing"
        argv = ["inspect", str(src)]
    return Expect(argv, message=message, names=("hostile.gguf", *names), outputs=(out,), isolate=isolate)


def _field(b: B.GGUFBuild, label: str) -> B.Field:
    return next(f for f in b.to_bytes()[1] if f.label == label)


def _patch(b: B.GGUFBuild, label: str, value: int) -> bytes:
    raw, _ = b.to_bytes()
    f = _field(b, label)
    return raw[:f.offset] + value.to_bytes(f.size, "little") + raw[f.offset + f.size:]


@case
def case_gguf_bad_magic(env):
    return _gguf_case(env, "convert", B.GGUFBuild(magic=b"GGML"), "magic")


@case
def case_gguf_future_version(env):
    b = B.tiny_llama_gguf()
    b.version = 99
    return _gguf_case(env, "quantize", b, "version 99")


@case
def case_gguf_version_1(env):
    b = B.tiny_llama_gguf()
    b.version = 1
    return _gguf_case(env, "inspect", b, "version 1")


@case
def case_gguf_empty_file(env):
    return _gguf_case(env, "convert", b"", "empty")


@case
def case_gguf_truncated_header(env):
    raw = B.tiny_llama_gguf().to_bytes()[0]
    return _gguf_case(env, "quantize", raw[:300], "truncated")


@case
def case_gguf_truncated_tensor_data(env):
    raw = B.tiny_llama_gguf().to_bytes()[0]
    return _gguf_case(env, "convert", raw[:-3000], "truncated", names=("tensor 'blk.0.ffn_down.weight'",))


@case
def case_gguf_absurd_tensor_count(env):
    b = B.tiny_llama_gguf()
    b.n_tensors = 1 << 62
    return _gguf_case(env, "quantize", b, f"claims {1 << 62} tensors")


@case
def case_gguf_absurd_kv_count(env):
    b = B.tiny_llama_gguf()
    b.n_kv = (1 << 64) - 1
    return _gguf_case(env, "convert", b, f"claims {(1 << 64) - 1} metadata pairs")


@case
def case_gguf_absurd_string_length(env):
    b = B.tiny_llama_gguf()
    return _gguf_case(env, "quantize", _patch(b, "strlen value general.name", 1 << 40),
                      "claims a length of", names=("key 'general.name'",))


@case
def case_gguf_absurd_key_length(env):
    b = B.tiny_llama_gguf()
    return _gguf_case(env, "convert", _patch(b, "strlen key general.file_type", (1 << 64) - 1), "claims a length of")


@case
def case_gguf_absurd_array_length(env):
    # 2^40 int32 token types in a 40 kB file: a reader that believes it loops (and allocates) forever
    b = B.tiny_llama_gguf()
    return _gguf_case(env, "convert", _patch(b, "count tokenizer.ggml.token_type", 1 << 40),
                      "array claims", names=("key 'tokenizer.ggml.token_type'",), isolate=True)


@case
def case_gguf_absurd_string_array_length(env):
    b = B.tiny_llama_gguf()
    return _gguf_case(env, "quantize", _patch(b, "count tokenizer.ggml.tokens", 1 << 33),
                      "array claims", names=("key 'tokenizer.ggml.tokens'",), isolate=True)


@case
def case_gguf_unknown_ggml_type(env):
    b = B.tiny_llama_gguf()
    return _gguf_case(env, "convert", _patch(b, "ggml_type output.weight", 99), "unknown GGML type 99",
                      names=("tensor 'output.weight'",))


@case
def case_gguf_type_without_dequantizer(env):
    import gguf

    b = B.tiny_llama_gguf(n_embd=256, n_ff=256, n_head=4, n_head_kv=2)
    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    name, ne = b.tensors[2][0], b.tensors[2][1]
    b.tensors[2] = (name, ne, int(gguf.GGMLQuantizationType.Q8_K), bytes(ne[1] * size), None)
    return _gguf_case(env, "convert", b, "Q8_K", names=(f"tensor '{name}'",))


@case
def case_gguf_row_not_whole_blocks(env):
    b = B.tiny_llama_gguf()
    name, _ne, _t, data, _o = b.tensors[2]
    b.tensors[2] = (name, (20, 8), B.GGML_Q8_0, data[: 8 * 34], None)  # Q8_0 blocks are 32 wide
    return _gguf_case(env, "quantize", b, "block size", names=("tensor 'output.weight'",))


@case
def case_gguf_too_many_dims(env):
    b = B.tiny_llama_gguf()
    name, ne, t, data, _o = b.tensors[1]
    b.tensors[1] = (name, (ne[0], 1, 1, 1, 1), t, data, None)
    return _gguf_case(env, "convert", b, "dimensions", names=("tensor 'output_norm.weight'",))


@case
def case_gguf_absurd_dims_count(env):
    b = B.tiny_llama_gguf()
    return _gguf_case(env, "quantize", _patch(b, "n_dims output_norm.weight", (1 << 32) - 1), "dimensions",
                      names=("tensor 'output_norm.weight'",))


@case
def case_gguf_duplicate_key(env):
    b = B.tiny_llama_gguf()
    b.kv("general.name", B.STR, "again")
    return _gguf_case(env, "convert", b, "appears twice", names=("key 'general.name'",))


@case
def case_gguf_duplicate_tensor(env):
    b = B.tiny_llama_gguf()
    b.tensors.append(b.tensors[1])
    return _gguf_case(env, "quantize", b, "appears twice", names=("tensor 'output_norm.weight'",))


@case
def case_gguf_alignment_not_power_of_two(env):
    b = B.tiny_llama_gguf()
    b.kv("general.alignment", B.U32, 24)
    return _gguf_case(env, "convert", b, "not a power of two", names=("key 'general.alignment'",))


@case
def case_gguf_unsupported_architecture(env):
    return _gguf_case(env, "convert", B.tiny_llama_gguf(arch="falcon"), "unsupported GGUF architecture 'falcon'",
                      names=("key 'general.architecture'",))


@case
def case_gguf_heads_do_not_divide_rows(env):
    # 3 heads for 32-row Q: the Q/K un-permutation cannot split the rows into heads
    b = B.tiny_llama_gguf()
    b.kvs = [(k, t, 3 if k == "llama.attention.head_count" else v, s) for k, t, v, s in b.kvs]
    return _gguf_case(env, "convert", b, "head", names=("key 'llama.attention.head_count'",))


@case
def case_gguf_tokens_not_strings(env):
    b = B.tiny_llama_gguf()
    b.kvs = [(k, t, list(range(len(v))) if k == "tokenizer.ggml.tokens" else v,
              B.I32 if k == "tokenizer.ggml.tokens" else s) for k, t, v, s in b.kvs]
    return _gguf_case(env, "convert", b, "tokenizer.ggml.tokens")


@case
def case_gguf_nan_weights(env):
    b = B.tiny_llama_gguf()
    name, ne, t, data, o = b.tensors[2]
    arr = np.frombuffer(data, np.float32).copy()
    arr[5] = np.inf
    b.tensors[2] = (name, ne, t, arr.tobytes(), o)
    return _gguf_case(env, "quantize", b, "NaN or infinite", names=("tensor 'output.weight'",))


# --- outputs -------------------------------------------------------------------------------------------


@case
def case_convert_output_exists(env):
    src = env.gguf()
    out = env.tmp / "existing.gguf"
    out.write_bytes(b"precious")
    return Expect(["convert", str(src), "-o", str(out)], message="output already exists (use --force",
                  names=("existing.gguf",), unchanged={out: b"precious"})


@case
def case_quantize_output_exists(env):
    src = env.gguf()
    out = env.tmp / "existing.Q8_0.gguf"
    out.write_bytes(b"precious")
    return Expect(["quantize", "q8_0", str(src), "-o", str(out)], message="output already exists",
                  names=("existing.Q8_0.gguf",), unchanged={out: b"precious"})


@case
def case_build_output_is_a_foreign_folder(env):
    """``-o`` naming a folder that is not a ggmerge build (here: the user's notes) must not replace it."""
    out = env.tmp / "my-notes"
    out.mkdir()
    (out / "notes.txt").write_text("years of work")
    return Expect(["build", str(env.recipe(DARE)), "-o", str(out)], message="already exists",
                  names=("my-notes",), unchanged={out / "notes.txt": b"years of work"})


@case
def case_build_output_is_its_input(env):
    """``-o`` naming one of the recipe's own models: the merge would delete its input."""
    m = env.variant("ft-copy")
    weights = (m / "model.safetensors").read_bytes()
    return Expect(["build", str(env.recipe(DARE.replace("FT1", str(m)))), "-o", str(m), "--force"],
                  message="would replace the recipe's input", names=("ft-copy",), unchanged={m / "model.safetensors": weights})


@case
def case_convert_onto_its_input(env):
    src = env.gguf()
    return Expect(["convert", str(src), "-o", str(src), "--force"], message="overwrite the input",
                  names=(src.name,), unchanged={src: src.read_bytes()})


@case
def case_quantize_onto_its_input(env):
    src = env.gguf()
    return Expect(["quantize", "q8_0", str(src), "-o", str(src), "--force"], message="overwrite the input",
                  names=(src.name,), unchanged={src: src.read_bytes()})


@case
def case_quantize_unknown_type(env):
    src = env.gguf()
    return Expect(["quantize", "q4_k_n", str(src)], message="did you mean 'Q4_K_",
                  names=("q4_k_n",), outputs=(env.tmp / "in.Q4_K_M.gguf",))


@case
def case_quantize_missing_input(env):
    src = env.tmp / "absent.gguf"
    return Expect(["quantize", "q8_0", str(src)], message="no such file or folder", names=("absent.gguf",))


@case
def case_convert_unknown_outtype(env):
    out = env.tmp / "o.gguf"
    return Expect(["convert", str(env.fam["base"]), "-o", str(out), "--outtype", "q4_k_m"],
                  message="unknown output type 'q4_k_m'", names=("outtype",), outputs=(out,))


@case
def case_convert_missing_chat_template_file(env):
    out = env.tmp / "o.gguf"
    return Expect(["convert", str(env.fam["base"]), "-o", str(out), "--chat-template", "vicunna"],
                  message="did you mean 'vicuna'", names=("vicunna",), outputs=(out,))


@case
def case_convert_template_on_gguf_input(env):
    out = env.tmp / "o-hf"
    return Expect(["convert", str(env.gguf()), "-o", str(out), "--chat-template", "vicuna"],
                  message="applies to HF → GGUF conversion only", names=("in.gguf",), outputs=(out,))


@case
def case_inspect_pickle(env):
    d = env.tmp / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch PWNED'\ntR.")
    shutil.copy(env.fam["base"] / "config.json", d)
    return Expect(["inspect", str(d)], message="never unpickles", names=("pytorch_model.bin",))


# --------------------------------------------------------------------------------------------------
# the corpus test
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path, tiny_family, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    e = Env(tmp_path, tiny_family)
    yield e
    assert not (tmp_path / "PWNED").exists(), "a pickle was executed"


def test_corpus_has_at_least_40_cases():
    assert len(CASES) >= 40, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, env, capsys):
    exp = CASES[name](env)
    capsys.readouterr()
    if exp.isolate:
        res = run_isolated(exp.argv, env=dict(os.environ))
    else:
        res = run_inprocess(exp.argv, capsys)
    check(exp, res)


#: corpus cases whose lie is in the file's header: ``ggmerge.limits.check_*_header`` must refuse each
#: with the corpus's message (so wiring it into the sources makes those cases pass)
HEADER_CASES = {
    "gguf": ["gguf_bad_magic", "gguf_future_version", "gguf_version_1", "gguf_empty_file",
             "gguf_truncated_header", "gguf_truncated_tensor_data", "gguf_absurd_tensor_count",
             "gguf_absurd_kv_count", "gguf_absurd_string_length", "gguf_absurd_key_length",
             "gguf_absurd_array_length", "gguf_absurd_string_array_length", "gguf_unknown_ggml_type",
             "gguf_row_not_whole_blocks", "gguf_too_many_dims", "gguf_absurd_dims_count", "gguf_duplicate_key",
             "gguf_duplicate_tensor", "gguf_alignment_not_power_of_two"],
    "safetensors": ["safetensors_truncated_data", "safetensors_shorter_than_length_field",
                    "safetensors_header_length_lies", "safetensors_header_not_json",
                    "safetensors_offsets_beyond_file", "safetensors_dtype_lies", "safetensors_unknown_dtype",
                    "safetensors_negative_shape", "safetensors_shape_lies"],
}


@pytest.mark.parametrize("name", HEADER_CASES["gguf"] + HEADER_CASES["safetensors"])
def test_header_precheck_gives_the_corpus_message(name, env):
    from ggmerge.limits import check_gguf_header, check_safetensors_header

    exp = CASES[name](env)
    if name.startswith("gguf"):
        target, check_fn = env.tmp / "hostile.gguf", check_gguf_header
    else:
        folder = next(Path(a) for a in (env.tmp / n for n in os.listdir(env.tmp)) if (a / "model.safetensors").exists())
        target, check_fn = folder / "model.safetensors", check_safetensors_header
    with pytest.raises(GGMergeError) as e:
        check_fn(target)
    line = str(e.value)
    assert exp.message.lower() in line.lower(), line
    for n in exp.names:
        if n not in line and not (env.tmp / n).exists():  # a folder name is in the path of its file
            pytest.fail(f"{line!r} does not name {n!r}")
    assert e.value.path == target


def test_debug_shows_the_traceback(env, capsys):
    """With --debug the same error propagates (the user gets the traceback they asked for)."""
    exp = case_unknown_method(env)
    with pytest.raises(GGMergeError, match="did you mean 'dare_ties'"):
        main(["--debug", *exp.argv])


# --------------------------------------------------------------------------------------------------
# no space left, unwritable output
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    d = tmp_path / "small-disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True,
                       check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _bigger_gguf(env) -> Path:
    # ~2.6 MB of F32: more than the 1 MiB disk
    return env.gguf("big.gguf", B.tiny_llama_gguf(n_vocab=700, n_embd=256, n_ff=512, n_head=4, n_head_kv=2))


@pytest.mark.parametrize("verb", ["quantize-f32", "convert-to-hf"])
def test_no_space_left_on_device(verb, env, tiny_tmpfs, capsys):
    src = _bigger_gguf(env)
    if verb == "quantize-f32":
        out = tiny_tmpfs / "m.F32.gguf"
        argv = ["quantize", "f32", str(src), "-o", str(out)]
    else:
        out = tiny_tmpfs / "m-hf"
        argv = ["convert", str(src), "-o", str(out), "--outtype", "f32"]
    exp = Expect(argv, message="no space left on device", names=(out.name,), outputs=(out,))
    check(exp, run_inprocess(argv, capsys))
    assert not list(tiny_tmpfs.iterdir()), "the full disk was not cleaned up"


def test_file_size_limit_efbig(env):
    """RLIMIT_FSIZE with SIGXFSZ ignored: write() fails with EFBIG; the message names the output."""
    src = _bigger_gguf(env)
    out = env.tmp / "capped.F32.gguf"
    import resource

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    res = run_isolated(["quantize", "f32", str(src), "-o", str(out)], preexec=cap, env=dict(os.environ))
    check(Expect([], message=os.strerror(errno.EFBIG), names=("capped.F32.gguf",), outputs=(out,)), res)


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot write into: chmod 0500 for a normal user; for root (which ignores
    permissions) a read-only tmpfs; skipped if neither is possible."""
    d = tmp_path / "locked"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o500)
        yield d
        d.chmod(0o700)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True,
                       check=False)
    if r.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("verb", ["quantize", "convert-to-hf", "build"])
def test_unwritable_output_directory(verb, env, unwritable_dir, capsys):
    if verb == "quantize":
        out = unwritable_dir / "m.Q8_0.gguf"
        argv = ["quantize", "q8_0", str(env.gguf()), "-o", str(out)]
    elif verb == "convert-to-hf":
        out = unwritable_dir / "m-hf"
        argv = ["convert", str(env.gguf()), "-o", str(out)]
    else:
        out = unwritable_dir / "merged"
        argv = ["build", str(env.recipe(DARE)), "-o", str(out)]
    exp = Expect(argv, message="not writable", names=(out.name,), outputs=(out,))
    check(exp, run_inprocess(argv, capsys))


# --------------------------------------------------------------------------------------------------
# nothing from a model file is executed
# --------------------------------------------------------------------------------------------------


def _package_sources() -> list[Path]:
    return sorted(p for d in (REPO / "ggmerge", REPO / "convert") for p in d.rglob("*.py"))


def test_trust_remote_code_is_never_enabled():
    hits = []
    for p in _package_sources():
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if "trust_remote_code" in line.replace(" ", "") and "trust_remote_code=False" not in line.replace(" ", ""):
                hits.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "trust_remote_code appears in the package:\n" + "\n".join(hits)


def test_no_unpickling_calls_in_the_package():
    """No torch.load / pickle.load / numpy allow_pickle in the package (pickles are refused, never read)."""
    bad = ("torch.load(", "pickle.load", "pickle.loads", "allow_pickle=True", "joblib.load", "dill.load")
    hits = [f"{p.relative_to(REPO)}:{i}: {ln.strip()}" for p in _package_sources()
            for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if any(b in ln for b in bad) and not ln.lstrip().startswith("#")]
    assert not hits, "\n".join(hits)


def test_chat_templates_render_only_in_a_sandbox():
    """Wherever the package renders Jinja it must use ImmutableSandboxedEnvironment: a plain
    ``jinja2.Template``/``Environment`` lets a model's chat template reach Python internals."""
    hits = []
    for p in _package_sources():
        text = p.read_text(encoding="utf-8")
        for i, ln in enumerate(text.splitlines(), 1):
            s = ln.replace(" ", "")
            if ("jinja2.Template(" in s or "jinja2.Environment(" in s or "fromjinja2importTemplate" in s
                    or "fromjinja2importEnvironment" in s or "SandboxedEnvironment(" in s and "Immutable" not in s):
                hits.append(f"{p.relative_to(REPO)}:{i}: {ln.strip()}")
    assert not hits, "unsandboxed Jinja in the package:\n" + "\n".join(hits)


#: a chat template that walks from a string to Python's object graph (the classic Jinja escape)
EVIL_TEMPLATE = "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_hostile_chat_template_is_refused_by_chat(env):
    """``ggmerge chat`` renders the GGUF's own template (llama-cpp-python's Jinja2ChatFormatter, an
    ImmutableSandboxedEnvironment): the escape must fail as one clear error, not run and not crash."""
    pytest.importorskip("llama_cpp")
    src = env.gguf("evil.gguf", B.tiny_llama_gguf(n_vocab=320, byte_tokens=True, chat_template=EVIL_TEMPLATE))
    res = run_isolated(["chat", str(src), "hello"], env=dict(os.environ))
    check(Expect([], message="chat template", names=("evil.gguf",)), res)
    assert "<class" not in res.out, "the template reached Python's class list"


def test_chat_templates_are_stored_as_data(env, capsys):
    """Converting with a hostile template stores it verbatim; nothing renders it on the way."""
    import gguf

    tpl = env.tmp / "evil.jinja"
    tpl.write_text(EVIL_TEMPLATE)
    out = env.tmp / "m.gguf"
    res = run_inprocess(["convert", str(env.fam["base"]), "-o", str(out), "--chat-template", str(tpl)], capsys)
    assert res.code == 0 and res.escaped is None, res.err
    assert gguf.GGUFReader(out).get_field("tokenizer.chat_template").contents() == EVIL_TEMPLATE

"""The tools ggmerge is measured against, and the exact command lines each pass runs.

- mergekit 0.1.5 in its own virtualenv (created here on first use, outside the repo, CPU torch 2.13.0),
  run with ``mergekit-yaml`` defaults plus ``--random-seed 0``;
- llama.cpp's ``convert_hf_to_gguf.py`` from the llama-cpp-python 0.3.36 sdist, with that sdist's gguf-py
  first on PYTHONPATH (the converter is written against it, not against the gguf wheel);
- llama.cpp's quantizer through llama-cpp-python's ``llama_model_quantize`` (``llama_quantize.py``).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("bench.anchors")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("GGMERGE_BENCH_DIR", "/tmp/ggmerge-bench"))
LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_DIR", "/work/ref/llama_cpp_python-0.3.36/vendor/llama.cpp"))
MERGEKIT_PINS = ["torch==2.13.0", "mergekit==0.1.5"]

#: children run offline (no Hub look-ups), unbuffered, without ggmerge's progress bars
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "PYTHONUNBUFFERED": "1", "GGMERGE_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"}


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    env.update(extra)
    return env


def ensure_mergekit(cache: Path = CACHE) -> Path:
    """The virtualenv's bin folder with mergekit-yaml, creating the venv on first use (~1 min)."""
    venv = cache / "venv-mergekit"
    bin_ = venv / "bin"
    stamp = venv / "ggmerge-bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("pins") == MERGEKIT_PINS:
        return bin_
    log.info("creating %s with %s", venv, " ".join(MERGEKIT_PINS))
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    with open(cache / "pip-mergekit.log", "w") as pip_log:
        subprocess.run([str(bin_ / "python"), "-m", "pip", "install", *MERGEKIT_PINS], check=True,
                       stdout=pip_log, stderr=subprocess.STDOUT)
    # torch==2.13.0 must resolve to the local CPU wheel; a CUDA build would drag in nvidia-* (GBs)
    code = ("import torch, importlib.metadata as m, json; print(json.dumps([torch.__version__, "
            "sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].lower().startswith('nvidia'))]))")
    probe = subprocess.run([str(bin_ / "python"), "-c", code], check=True, capture_output=True, text=True)
    torch_version, nvidia = json.loads(probe.stdout)
    if nvidia or "+cpu" not in torch_version:
        raise SystemExit(f"{venv}: got torch {torch_version} with {nvidia}; expected the CPU wheel only")
    stamp.write_text(json.dumps({"pins": MERGEKIT_PINS, "torch": torch_version}) + "\n")
    return bin_


def mergekit_cmd(bin_: Path, config: Path, out: Path) -> list[str]:
    return [str(bin_ / "mergekit-yaml"), str(config), str(out), "--random-seed", "0"]


def llama_convert_cmd(model: Path, out: Path, outtype: str = "bf16") -> tuple[list[str], dict[str, str]]:
    script = LLAMA_CPP / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"llama.cpp converter not found at {script} (set LLAMA_CPP_DIR)")
    env = child_env(PYTHONPATH=os.pathsep.join(
        [str(LLAMA_CPP / "gguf-py")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return [sys.executable, str(script), str(model), "--outfile", str(out), "--outtype", outtype], env


def llama_quantize_cmd(inp: Path, out: Path, qtype: str, nthread: int = 2) -> list[str]:
    return [sys.executable, str(HERE / "llama_quantize.py"), str(inp), str(out), qtype, "--nthread", str(nthread)]


def ggmerge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ggmerge.cli", *args]


def floor_cmd(out: Path, n_bytes: int, inputs: list[Path]) -> list[str]:
    return [sys.executable, str(HERE / "floor.py"), str(out), str(n_bytes), *map(str, inputs)]

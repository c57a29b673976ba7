"""mergekit 0.1.5 as a reference, where it is installed: its own ``mergekit-yaml`` in its own venv.

The venv is ``$GGMERGE_MERGEKIT_VENV`` (default: the benchmark venv on the development machine,
/tmp/ggmerge-bench/venv-mergekit; ``python -m venv V && V/bin/pip install mergekit==0.1.5`` makes one — a
separate venv because mergekit pins its own torch/transformers/peft). Tests that compare with mergekit skip
with the reason when it is absent.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

VENV = Path(os.environ.get("GGMERGE_MERGEKIT_VENV", "/tmp/ggmerge-bench/venv-mergekit"))
PYTHON = VENV / "bin" / "python"

#: one process for many recipes (mergekit imports take seconds); mergekit-multi for `---` files
_DRIVER = r"""
import json, sys, traceback
from mergekit.scripts.run_yaml import main as run_yaml
from mergekit.scripts.multimerge import main as run_multi
results = []
for cfg, out, multi, extra in json.load(open(sys.argv[1])):
    try:
        if multi:
            run_multi.main(args=[cfg, "--intermediate-dir", out + ".stages", "--out-path", out, "--random-seed",
                                 "0", "--no-write-model-card", "--quiet"] + extra, standalone_mode=False)
        else:
            run_yaml.main(args=[cfg, out, "--random-seed", "0", "--no-write-model-card", "--quiet"] + extra,
                          standalone_mode=False)
        results.append(None)
    except BaseException as e:  # noqa: BLE001 - report, go on with the next recipe
        results.append("".join(traceback.format_exception_only(type(e), e)).strip()[-2000:])
json.dump(results, open(sys.argv[2], "w"))
"""


def available() -> bool:
    return PYTHON.is_file()


def require() -> None:
    if not available():
        pytest.skip(f"mergekit 0.1.5 is not installed here (set GGMERGE_MERGEKIT_VENV; looked in {VENV})")


def run(jobs: list[tuple[Path, Path, bool, list[str]]], work: Path) -> list[str | None]:
    """Run mergekit on each (recipe, output folder, multi-document?, extra args); the error text of
    each failed run, None for a success."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "jobs.json").write_text(json.dumps([[str(c), str(o), m, e] for c, o, m, e in jobs]))
    # one thread: torch splits large reductions (norms, dots) over its threads, so mergekit's own float32
    # result on a big tensor changes in the last bits with the thread count; single-threaded it is the
    # sequential order ggmerge computes in (which never depends on --threads)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                        "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([str(PYTHON), "-c", _DRIVER, str(work / "jobs.json"), str(work / "results.json")],
                       env=env, capture_output=True, text=True, cwd=work)
    if r.returncode:
        raise RuntimeError(f"mergekit driver failed:\n{r.stderr[-3000:]}")
    return json.loads((work / "results.json").read_text())


def load_output(folder: Path) -> dict:
    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}

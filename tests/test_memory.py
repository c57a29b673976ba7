"""Peak memory of real runs does not grow with the model: it stays a few times the largest tensor.

Each pass runs as a child process (``python -c ... ggmerge.cli.main``, spawned by a small launcher) and
its peak resident set is the kernel's own ``ru_maxrss`` from ``os.wait4``: the number a user or a batch scheduler sees, file-backed
pages of memory-mapped inputs included. From it we subtract the peak of a second child that only
imports every module the first one imported (torch, numba, tokenizer libraries, ...), which is what any
run costs whatever the model. What remains must be below a few float32 copies of the largest tensor
(ggmerge holds every tensor as float32 while it works on it), times the number of inputs for a merge.

The model is ~215 MB of bf16 (14 layers, hidden 256, ffn 8192, the real 32000-piece Mistral
vocabulary) whose largest tensor, the embedding, is 16.4 MB (32.8 MB as float32): reading every input
page into the process, as a memory map of the whole file does, would cost ~13× that largest tensor
per input and fail these bounds; streaming tensor by tensor does not.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from ggmerge import procstats
from ggmerge.miniature import config, tensor_shapes, write_tokenizer
from ggmerge.writers.hf import HFWriter

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and fork+exec semantics of Linux")]

CFG = config(hidden_size=256, intermediate_size=8192, num_hidden_layers=14, num_attention_heads=4,
             num_key_value_heads=2)
#: float32 bytes of the largest tensor (embed_tokens / lm_head: 32000 × 256)
LARGEST_F32 = max(torch.Size(s).numel() for s in tensor_shapes(CFG).values()) * 4
#: allowed (peak RSS − import baseline), in float32 copies of the largest tensor per input
COPIES = 6


def _extra_rss(args: list, cwd: Path) -> tuple[int, int]:
    """(peak RSS of ``ggmerge ARGS`` in a child, peak RSS of a child importing the same modules), measured
    as the memory benchmark measures them (ggmerge/procstats.py)."""
    m = procstats.measure_ggmerge([str(a) for a in args], cwd)
    return m["maxrss"], m["baseline"]


def _check(peak: int, base: int, n_inputs: int, what: str) -> None:
    extra = peak - base
    limit = COPIES * LARGEST_F32 * n_inputs
    print(f"{what}: peak {peak / 1e6:.0f} MB, import baseline {base / 1e6:.0f} MB, extra {extra / 1e6:.0f} MB "
          f"(limit {limit / 1e6:.0f} MB)")
    assert extra < limit, (
        f"{what}: peak RSS {peak / 1e6:.0f} MB − import baseline {base / 1e6:.0f} MB = {extra / 1e6:.0f} MB "
        f"= {extra / LARGEST_F32:.1f} float32 copies of the largest tensor ({LARGEST_F32 / 1e6:.1f} MB) "
        f"for {n_inputs} input(s); allowed {COPIES} per input")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The ~215 MB bf16 model, written tensor by tensor through the HF writer."""
    folder = tmp_path_factory.mktemp("memory") / "base"
    g = torch.Generator().manual_seed(0)
    with HFWriter(folder) as w:
        for name, shape in tensor_shapes(CFG).items():
            w.add(name, torch.randn(shape, generator=g) * (0.02 if len(shape) > 1 else 1.0))
        w.finish(CFG)
    write_tokenizer(folder)
    assert sum(f.stat().st_size for f in folder.glob("*.safetensors")) > 200e6
    return folder


def test_convert_hf_to_gguf_streams(model, tmp_path):
    peak, base = _extra_rss(["convert", model, "-o", tmp_path / "m.gguf", "--outtype", "bf16"], tmp_path)
    _check(peak, base, 1, "convert HF → BF16 GGUF")


def test_three_input_build_streams(model, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    # three distinct files (not links: each must be read on its own); equal weights are fine here,
    # the merge does the same work whatever the values
    for role in ("base", "ft1", "ft2"):
        shutil.copytree(model, models / role)
    (tmp_path / "task3.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: models/base\nmodels:\n"
        "  - model: models/ft1\n    parameters: {weight: 0.5}\n"
        "  - model: models/ft2\n    parameters: {weight: 0.5}\n"
        "dtype: bfloat16\nggmerge: {name: task3}\n")
    peak, base = _extra_rss(["build", tmp_path / "task3.yaml", "-o", tmp_path / "out"], tmp_path)
    _check(peak, base, 3, "build task_arithmetic of 3 models")

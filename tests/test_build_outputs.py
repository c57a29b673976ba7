"""One read, every output: `build --gguf` writes each GGUF from the build's own pass, byte-identical to
`quantize` of the HF output; re-runs skip what is current and add only new types; one writer per output."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ggmerge.build as build_mod
import ggmerge.evaluator as evaluator
from ggmerge.atomic import TMP_SUFFIX, output_lock
from ggmerge.build import build
from ggmerge.errors import GGMergeError
from ggmerge.quantize import quantize

# the seed-shaped lineage of tiny models the build tests use (a module-scoped fixture: made once here)
from test_build import lineage  # noqa: E402,F401


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_every_gguf_equals_quantize_of_the_hf_output(lineage, tmp_path, monkeypatch):
    # small chunks and a low streaming threshold: embeddings AND a permuted q_proj go out row block by
    # row block, the way a Llama-3 embedding does
    monkeypatch.setattr(evaluator, "CHUNK_ELEMS", 1000)
    monkeypatch.setattr(build_mod, "STREAM_ELEMS", 4000)
    out = tmp_path / "m"
    build(str(lineage / "ggmerge.yaml"), str(out), gguf="q8_0,q4_k_m,bf16", threads=2)
    record = json.loads((out / "ggmerge-build.json").read_text())
    card = (out / "README.md").read_text()
    for t in ("Q8_0", "Q4_K_M", "BF16"):
        made = tmp_path / f"m.{t}.gguf"
        sep = quantize(t.lower(), str(out), str(tmp_path / f"sep.{t}.gguf"))
        assert made.read_bytes() == sep.read_bytes(), t
        assert record["gguf"][made.name]["sha256"] == _sha(made)
        assert _sha(made) in card
    # the HF output is the one a build without GGUF outputs writes
    plain = build(str(lineage / "ggmerge.yaml"), str(tmp_path / "plain"), threads=1)
    for f in plain.glob("*.safetensors"):
        assert f.read_bytes() == (out / f.name).read_bytes()


def test_reruns_skip_current_outputs_and_add_only_new_types(lineage, tmp_path):
    out = tmp_path / "m"
    build(str(lineage / "ggmerge.yaml"), str(out), gguf="q8_0")
    shard, q8 = out / "model.safetensors", tmp_path / "m.Q8_0.gguf"
    before = (shard.stat().st_mtime_ns, q8.stat().st_mtime_ns)
    build(str(lineage / "ggmerge.yaml"), str(out), gguf="q8_0")  # nothing to do
    assert (shard.stat().st_mtime_ns, q8.stat().st_mtime_ns) == before
    quantize("q8_0", str(out))  # the two-step form sees the build's own file as up to date
    assert q8.stat().st_mtime_ns == before[1]
    build(str(lineage / "ggmerge.yaml"), str(out), gguf="q8_0,q4_k_m")  # only the new type is made
    assert (shard.stat().st_mtime_ns, q8.stat().st_mtime_ns) == before
    q4 = tmp_path / "m.Q4_K_M.gguf"
    assert q4.read_bytes() == quantize("q4_k_m", str(out), str(tmp_path / "sep.gguf")).read_bytes()
    record = json.loads((out / "ggmerge-build.json").read_text())
    assert set(record["gguf"]) == {q8.name, q4.name} and record["gguf"][q4.name]["sha256"] == _sha(q4)
    q4.unlink()  # a listed output that went missing is made again
    build(str(lineage / "ggmerge.yaml"), str(out), gguf="q4_k_m")
    assert q4.is_file() and shard.stat().st_mtime_ns == before[0]


def test_gguf_only_build(lineage, tmp_path):
    out = tmp_path / "only" / "m"  # the same name as the full build's: general.name is the folder name
    build(str(lineage / "ggmerge.yaml"), str(tmp_path / "full" / "m"), gguf="q6_k")
    build(str(lineage / "ggmerge.yaml"), str(out), gguf="q6_k", no_hf=True)
    assert not out.exists()
    assert (tmp_path / "only" / "m.Q6_K.gguf").read_bytes() == (tmp_path / "full" / "m.Q6_K.gguf").read_bytes()
    with pytest.raises(GGMergeError, match="--no-hf"):
        build(str(lineage / "ggmerge.yaml"), str(out), no_hf=True)


def test_recipe_key_asks_for_ggufs(lineage, tmp_path):
    text = (lineage / "ggmerge.yaml").read_text().replace("ggmerge:\n", "ggmerge:\n  gguf: [q8_0]\n")
    recipe = lineage / "with-gguf.yaml"
    recipe.write_text(text)
    build(str(recipe), str(tmp_path / "m"))
    assert (tmp_path / "m.Q8_0.gguf").is_file()
    recipe.write_text(text.replace("[q8_0]", "[q8_1]"))
    with pytest.raises(GGMergeError, match="gguf"):
        build(str(recipe), str(tmp_path / "m2"), dry_run=True)


def test_a_failing_multi_output_build_leaves_nothing_that_looks_finished(lineage, tmp_path, monkeypatch):
    from ggmerge.gguf_outputs import GGUFOutputs

    calls = []
    real = GGUFOutputs.encode

    def failing(self, name, t):
        calls.append(name)
        if len(calls) == 8:
            raise GGMergeError("simulated failure", tensor=name)
        return real(self, name, t)

    monkeypatch.setattr(GGUFOutputs, "encode", failing)
    with pytest.raises(GGMergeError, match="simulated"):
        build(str(lineage / "ggmerge.yaml"), str(tmp_path / "m"), gguf="q8_0,q4_k_m", threads=2)
    assert sorted(os.listdir(tmp_path)) == []  # no output, no partial file, no lock


def test_a_second_writer_of_one_output_is_refused_and_loses_nothing(lineage, tmp_path):
    out = tmp_path / "m"
    partial = out.with_name(out.name + TMP_SUFFIX)
    partial.mkdir()  # the first writer's work in progress
    (partial / "model.safetensors").write_bytes(b"half")
    env = dict(os.environ, GGMERGE_PROGRESS="0")
    with output_lock(out):  # the first writer holds the output
        r = subprocess.run([sys.executable, "-m", "ggmerge.cli", "build", str(lineage / "ggmerge.yaml"), "-o",
                            str(out)], capture_output=True, text=True, env=env)
        assert r.returncode != 0
        assert f"another ggmerge (pid {os.getpid()}) is writing this output" in r.stderr
        assert (partial / "model.safetensors").read_bytes() == b"half"
    # the first writer is gone (its lock with it): its leftovers are cleared and the build succeeds
    r = subprocess.run([sys.executable, "-m", "ggmerge.cli", "build", str(lineage / "ggmerge.yaml"), "-o",
                        str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").stat().st_size > 1000 and not partial.exists()


def test_quantize_cli_takes_several_types_and_an_input(lineage, tmp_path):
    out = build(str(lineage / "ggmerge.yaml"), str(tmp_path / "m"))
    env = dict(os.environ, GGMERGE_PROGRESS="0")
    cli = [sys.executable, "-m", "ggmerge.cli", "quantize"]
    r = subprocess.run(cli + ["q8_0", "q4_k_m", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for t in ("Q8_0", "Q4_K_M"):
        made = tmp_path / f"m.{t}.gguf"
        assert made.read_bytes() == quantize(t, str(out), str(tmp_path / f"one.{t}.gguf")).read_bytes()
    r = subprocess.run(cli + ["q4_k_m", "q8_1"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "unknown quantization type 'q8_1'" in r.stderr


def test_build_imatrix_gguf_equals_quantize_with_the_same_imatrix(lineage, tmp_path, monkeypatch):
    """`build --gguf T --imatrix F` == `quantize T <hf output> --imatrix F` byte for byte (rows streamed
    block by block keep their columns' weights); a later run without the imatrix remakes the file."""
    from test_imatrix_quantize import synthetic_imatrix

    monkeypatch.setattr(evaluator, "CHUNK_ELEMS", 1000)
    monkeypatch.setattr(build_mod, "STREAM_ELEMS", 4000)
    out = tmp_path / "m"
    build(str(lineage / "ggmerge.yaml"), str(out), threads=1)
    im = synthetic_imatrix(quantize("f16", str(out), str(tmp_path / "shapes.F16.gguf")), tmp_path / "im.gguf")
    build(str(lineage / "ggmerge.yaml"), str(tmp_path / "w"), gguf="q4_k_m,iq4_xs", imatrix=str(im), threads=2)
    for t in ("Q4_K_M", "IQ4_XS"):
        sep = quantize(t, str(tmp_path / "w"), str(tmp_path / f"sep.{t}.gguf"), imatrix=str(im))
        made = tmp_path / f"w.{t}.gguf"
        assert made.read_bytes() == sep.read_bytes(), t
        assert made.read_bytes() != quantize(t, str(tmp_path / "w"), str(tmp_path / f"plain.{t}.gguf")).read_bytes()
    stamp = (tmp_path / "w.Q4_K_M.gguf").stat().st_mtime_ns
    build(str(lineage / "ggmerge.yaml"), str(tmp_path / "w"), gguf="q4_k_m", imatrix=str(im))  # current
    assert (tmp_path / "w.Q4_K_M.gguf").stat().st_mtime_ns == stamp
    build(str(lineage / "ggmerge.yaml"), str(tmp_path / "w"), gguf="q4_k_m")  # no imatrix now: remade
    assert (tmp_path / "w.Q4_K_M.gguf").read_bytes() == (tmp_path / "plain.Q4_K_M.gguf").read_bytes()
    with pytest.raises(GGMergeError, match="--imatrix weights the GGUF quants"):
        build(str(lineage / "ggmerge.yaml"), str(tmp_path / "w"), imatrix=str(im))

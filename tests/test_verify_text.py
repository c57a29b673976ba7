"""``ggmerge verify --text-file`` and ``ggmerge imatrix`` against llama.cpp's own tools on the tiny model
and a real text (numpy's LICENSE.txt): llama-perplexity --kl-divergence and llama-imatrix, same text,
context and chunks."""
from __future__ import annotations

import ctypes
import json
import re
import subprocess

import numpy as np
import pytest

from texts import numpy_license

CTX, CHUNKS = 128, 4


@pytest.fixture(scope="session")
def tiny_ggufs(tiny_mistral, tmp_path_factory):
    """The tiny Mistral as F32 GGUF (ggmerge convert) and llama.cpp's Q8_0 / Q4_0 of it."""
    import llama_cpp

    from ggmerge.convert import convert

    d = tmp_path_factory.mktemp("tiny_ggufs")
    out = {"F32": convert(str(tiny_mistral), str(d / "tiny.F32.gguf"), outtype="f32")}
    for name, ft in (("Q8_0", 7), ("Q4_0", 2)):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread = ft, 1
        out[name] = d / f"tiny.{name}.gguf"
        assert llama_cpp.llama_model_quantize(str(out["F32"]).encode(), str(out[name]).encode(),
                                              ctypes.byref(p)) == 0
    return out


def _run_tool(argv, marker):
    """Run a llama.cpp tool until its output matches the regex ``marker``: llama.cpp logs from a background
    thread and, on a loaded machine, the process sometimes exits before its last lines are (fully) written."""
    for _ in range(3):
        r = subprocess.run(list(map(str, argv)), check=True, capture_output=True, text=True)
        if re.search(marker, r.stdout + r.stderr):
            return r.stdout + r.stderr
    raise AssertionError(f"{marker!r} never printed:\n{(r.stdout + r.stderr)[-3000:]}")


def _llama_perplexity(ggufs, tmp_path):
    from llama_tools import EVAL_FLAGS, tool

    exe, base = tool("llama-perplexity"), tmp_path / "base.kld"
    # one window per batch, no flash attention, F32 cache: the computation llama-cpp-python runs (with its
    # defaults llama-perplexity batches windows and uses flash attention, which moves PPL by a few per mille)
    common = ["-f", numpy_license(), "-c", CTX, "--chunks", CHUNKS, "-ctk", "f32", "-ctv", "f32", "-t", 2,
              "-b", CTX, "-fa", "off", *EVAL_FLAGS]
    txt = _run_tool([exe, "-m", ggufs["F32"], "--kl-divergence-base", base, *common], r"Final estimate: PPL = [\d.]+")
    # the base run's PPL is exact; the --kl-divergence runs' "PPL(base)" is read back from 16-bit steps
    res = {"ref_ppl": float(re.search(r"Final estimate: PPL = ([\d.]+)", txt).group(1))}
    for t in ("Q8_0", "Q4_0"):
        txt = _run_tool([exe, "-m", ggufs[t], "--kl-divergence-base", base, "--kl-divergence", *common],
                        r"(?s)Mean PPL\(Q\)\s*:\s*[\d.]+.*Mean\s+KLD:\s*[\d.]+.*Same top p:\s*[\d.]+")
        res[t] = {k: float(re.search(p, txt).group(1)) for k, p in (
            ("ppl", r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
            ("kld", r"Mean\s+KLD:\s*([\d.]+)"), ("top", r"Same top p:\s*([\d.]+)"))}
    return res


@pytest.fixture(scope="session")
def ours(tiny_ggufs, tiny_mistral):
    from ggmerge.verify import verify

    kw = dict(text_file=str(numpy_license()), ctx=CTX, chunks=CHUNKS)
    files = [str(tiny_ggufs["F32"]), str(tiny_ggufs["Q8_0"]), str(tiny_ggufs["Q4_0"])]
    return {"llama.cpp": verify(files, ref=str(tiny_ggufs["F32"]), **kw),
            "forward": verify(files, ref=str(tiny_mistral), **kw)}


def test_text_mode_matches_llama_perplexity(ours, tiny_ggufs, tmp_path):
    theirs = _llama_perplexity(tiny_ggufs, tmp_path)
    for engine, rep in ours.items():
        assert rep["chunks"] == CHUNKS and rep["scored_tokens"] == CHUNKS * (CTX // 2 - 1)
        by_type = {r["file_type"]: r for r in rep["results"]}
        for t in ("Q8_0", "Q4_0"):
            r, th = by_type[t], theirs[t]
            assert r["ppl"] == pytest.approx(th["ppl"], rel=1e-4), (engine, t)
            assert r["ref_ppl"] == pytest.approx(theirs["ref_ppl"], rel=1e-4), (engine, t)
            assert r["kld_mean"] == pytest.approx(th["kld"], rel=0.03), (engine, t, r["kld_mean"], th["kld"])
            # llama-perplexity's own estimator (16-bit reference log-probs, e⁻¹⁶ cut) on our logits
            assert r["kld_mean_llama"] == pytest.approx(th["kld"], rel=2e-3), (engine, t, r["kld_mean_llama"])
            # llama-perplexity picks the reference top-1 from 16-bit log-prob steps: near-ties of this
            # random model can rank differently (5 of 252 tokens seen)
            assert 100 * r["top1_agreement"] == pytest.approx(th["top"], abs=3.0), (engine, t)


def test_reference_engines_agree(ours):
    """transformers (layer by layer) on the HF folder and llama.cpp on its F32 GGUF: the same model."""
    a = {r["file_type"]: r for r in ours["llama.cpp"]["results"]}
    b = {r["file_type"]: r for r in ours["forward"]["results"]}
    assert a["ALL_F32"]["kld_mean"] < 1e-9          # the reference against itself
    assert b["ALL_F32"]["kld_mean"] < 1e-6          # llama.cpp's F32 GGUF against transformers
    assert b["ALL_F32"]["ref_ppl"] == pytest.approx(a["ALL_F32"]["ref_ppl"], rel=1e-4)
    for t in ("Q8_0", "Q4_0"):
        assert b[t]["kld_mean"] == pytest.approx(a[t]["kld_mean"], rel=0.01)


def test_json_output(tiny_ggufs, capsys):
    from ggmerge.cli import main

    rc = main(["verify", str(tiny_ggufs["Q8_0"]), "--ref", str(tiny_ggufs["F32"]), "--text-file",
               str(numpy_license()), "--ctx", "64", "--chunks", "2", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["chunks"] == 2 and d["ctx"] == 64 and d["reference_engine"] == "llama.cpp"
    assert set(d["results"][0]) >= {"ppl", "delta_ppl", "kld_mean", "kld_median", "kld_p99", "kld_max",
                                    "top1_agreement"}


def test_imatrix_matches_llama_imatrix(tiny_ggufs, tmp_path):
    from llama_tools import EVAL_FLAGS, tool

    from ggmerge.imatrix.collect import imatrix
    from ggmerge.imatrix.files import load_imatrix

    theirs, mine = tmp_path / "llama.imatrix.gguf", tmp_path / "ours.imatrix.gguf"
    subprocess.run([str(tool("llama-imatrix")), "-m", str(tiny_ggufs["F32"]), "-f", str(numpy_license()),
                    "-c", str(CTX), "--chunks", str(CHUNKS), "-o", str(theirs), "-t", "2", *EVAL_FLAGS],
                   check=True, capture_output=True)
    imatrix(str(tiny_ggufs["F32"]), text_file=str(numpy_license()), ctx=CTX, chunks=CHUNKS, output=str(mine))
    a, b = load_imatrix(theirs), load_imatrix(mine)
    assert sorted(a.entries) == sorted(b.entries) and len(a.entries) == 2 * 7
    assert (a.chunk_count, a.chunk_size) == (b.chunk_count, b.chunk_size) == (CHUNKS, CTX)
    for name, ea in a.entries.items():
        eb = b.entries[name]
        assert np.array_equal(ea.counts, eb.counts), name
        va, vb = ea.sums.astype(np.float64), eb.sums.astype(np.float64)
        assert np.linalg.norm(vb - va) / np.linalg.norm(va) < 0.01, name


def test_too_short_text_is_one_clear_error(tiny_ggufs, tmp_path, capsys):
    from ggmerge.cli import main

    short = tmp_path / "short.txt"
    short.write_text(numpy_license().read_text()[:300])
    out = tmp_path / "x.gguf"
    assert main(["imatrix", str(tiny_ggufs["F32"]), "--text-file", str(short), "--ctx", str(CTX),
                 "-o", str(out)]) == 1
    # (llama.cpp's own loader may warn on stderr about the vocabulary-only context; ours is one line)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ggmerge:")]
    assert len(err) == 1 and "short.txt" in err[0] and "needs at least 256" in err[0]
    assert not out.exists()


def test_prompt_mode_takes_a_gguf_reference(tiny_ggufs, tiny_mistral):
    """One-prompt mode with --ref F32.gguf (run by the layer-wise forward pass) gives what --ref HF gives."""
    from ggmerge.verify import verify

    files = [str(tiny_ggufs["F32"]), str(tiny_ggufs["Q4_0"])]
    by_gguf = verify(files, ref=str(tiny_ggufs["F32"]), text="The licence text says so.")
    by_hf = verify(files, hf=str(tiny_mistral), text="The licence text says so.")
    assert by_gguf[0].tokens_match and by_gguf[0].kl_mean < 1e-6
    assert by_gguf[1].kl_mean == pytest.approx(by_hf[1].kl_mean, rel=1e-3)

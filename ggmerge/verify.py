"""``ggmerge verify``: do the GGUF files behave like the HF model?

The HF folder runs in transformers (float32); each GGUF runs in llama.cpp through llama-cpp-python with
an F32 KV cache (see ``ggmerge.llamacpp``) (llama.cpp's default F16 cache alone moves logits by ~1e-3 of their range, which would
hide what the file itself does). Both score the same token ids; we report whether llama.cpp tokenizes the
text identically, top-1 agreement of the next-token predictions, the mean and max KL divergence
KL(HF ‖ GGUF) per position, and max |Δlogit| relative to max |logit|.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import GGMergeError

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    gguf: str
    file_type: str
    tokens: int
    tokens_match: bool
    top1_agreement: float
    kl_mean: float
    kl_max: float
    max_rel_logit_diff: float


def default_hf_for(gguf_path: Path) -> Path:
    """``out/<name>.<TYPE>.gguf`` was made from ``out/<name>/``."""
    m = re.match(r"^(.*)\.[A-Za-z0-9_]+\.gguf$", gguf_path.name)
    cand = gguf_path.with_name(m.group(1)) if m else gguf_path.with_suffix("")
    if not (cand / "config.json").is_file():
        raise GGMergeError(f"cannot tell which HF model it came from (looked for {cand}); pass --hf",
                           path=gguf_path)
    return cand


def hf_logits(hf_dir: Path, text: str) -> tuple[list[int], np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    return ids, logits


def gguf_ref_logits(path: Path, text: str) -> tuple[list[int], np.ndarray]:
    """A BF16/F16 GGUF as the reference: tokens from llama.cpp, logits from transformers through the
    layer-wise forward pass (the GGUF dequantized, Q/K un-permuted)."""
    import torch

    from .forward import LayerwiseModel
    from .llamacpp import load
    from .sources import open_source

    llm = load(path, vocab_only=True)
    try:
        ids = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
    finally:
        llm.close()
    got = []
    LayerwiseModel(open_source(path)).run(torch.tensor([ids]), on_logits=lambda i, x: got.append(x.numpy()))
    return ids, got[0]


def gguf_logits(path: Path, ids: list[int], text: str) -> tuple[list[int], np.ndarray]:
    from .llamacpp import load

    llm = load(path, n_ctx=max(64, len(ids) + 8), logits_all=True)
    try:
        own_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # "</s>" in a prompt is EOS, as in HF
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    return own_ids, logits


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float, float]:
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    rel = float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-12))
    return top1, float(kl.mean()), float(kl.max()), rel


def verify(gguf: list[str], *, ref: str | None = None, hf: str | None = None, text: str | None = None,
           text_file: str | None = None, ctx: int = 512, chunks: int | None = None, json: bool = False,
           ref_engine: str = "auto"):
    """Compare GGUF files with a reference model.

    Without ``text_file``: the one-prompt check below (transformers vs llama.cpp on the seed's prompt or
    ``text``). With ``text_file``: perplexity and KL divergence over the text, chunked like
    ``llama-perplexity --kl-divergence`` (:func:`verify_text`). ``hf`` is an alias of ``ref``.
    """
    ref = ref or hf
    paths = [Path(g) for g in gguf]
    for p in paths:
        if not p.is_file():
            raise GGMergeError("no such GGUF file", path=p)
    if text_file is not None:
        return verify_text(paths, ref=ref, text_file=text_file, ctx=ctx, chunks=chunks, as_json=json,
                           ref_engine=ref_engine)
    return _verify_prompt(paths, ref=ref, text=text, as_json=json)


def _verify_prompt(paths: list[Path], *, ref: str | None, text: str | None, as_json: bool) -> list[Verdict]:
    from .prompts import SEED_PROMPT_TURN2
    from .report import out, print_json

    text = text or SEED_PROMPT_TURN2
    hf_dir = Path(ref) if ref else default_hf_for(paths[0])
    if hf_dir.suffix.lower() == ".gguf":
        ids, ref_logits = gguf_ref_logits(hf_dir, text)
    else:
        ids, ref_logits = hf_logits(hf_dir, text)
    results = []
    for p in paths:
        own_ids, got = gguf_logits(p, ids, text)
        top1, klm, klx, rel = compare(ref_logits, got)
        results.append(Verdict(gguf=str(p), file_type=_file_type(p), tokens=len(ids),
                               tokens_match=list(own_ids) == list(ids), top1_agreement=top1,
                               kl_mean=klm, kl_max=klx, max_rel_logit_diff=rel))
    if as_json:
        print_json({"reference": str(hf_dir), "mode": "prompt", "results": [asdict(r) for r in results]})
        return results
    from rich.table import Table

    t = Table(title=f"{hf_dir} (transformers, float32) vs llama.cpp, {len(ids)} tokens")
    for c in ("GGUF", "type", "same tokens", "top-1 agree", "KL mean", "KL max", "max|Δ|/max|logit|"):
        t.add_column(c)
    for r in results:
        t.add_row(Path(r.gguf).name, r.file_type, "yes" if r.tokens_match else "NO", f"{r.top1_agreement:.3f}",
                  f"{r.kl_mean:.2e}", f"{r.kl_max:.2e}", f"{r.max_rel_logit_diff:.2e}")
    out.print(t)
    for r in results:
        log.debug("%s", asdict(r))
    return results


@dataclass
class TextVerdict:
    """One GGUF scored over a text against the reference (the figures of llama-perplexity --kl-divergence)."""

    gguf: str
    file_type: str
    tokens_match: bool
    tokens: int
    ppl: float
    ppl_err: float
    ref_ppl: float
    ref_ppl_err: float
    delta_ppl: float
    ln_ppl_ratio: float
    kld_mean: float
    kld_err: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    top1_err: float
    #: KLD mean as llama-perplexity estimates it (16-bit reference log-probs, tail below e⁻¹⁶ dropped)
    kld_mean_llama: float
    seconds: float


def verify_text(paths: list[Path], *, ref: str | None, text_file: str, ctx: int = 512,
                chunks: int | None = None, as_json: bool = False, ref_engine: str = "auto") -> dict:
    """Perplexity of the reference and of each GGUF over ``text_file``, and KL divergence, top-1
    agreement and Δppl of each GGUF against the reference (:mod:`ggmerge.perplexity`).

    Tokens come from llama.cpp's tokenizer of the first GGUF (as llama-perplexity tokenizes). The
    reference runs through the layer-wise forward pass (``ref_engine='forward'``; the default for HF
    folders) or, for a GGUF reference, through llama.cpp (``'llama.cpp'``; the default for GGUFs, which
    is what llama-perplexity --kl-divergence-base does).
    """
    import time

    from . import perplexity as px
    from .calibration import make_chunks, read_text, tokenize_llamacpp
    from .progress import steps
    from .report import print_json
    from .sources import open_source

    ref_path = Path(ref) if ref else default_hf_for(paths[0])
    is_gguf_ref = ref_path.suffix.lower() == ".gguf"
    if ref_engine == "auto":
        ref_engine = "llama.cpp" if is_gguf_ref else "forward"
    if ref_engine not in ("forward", "llama.cpp"):
        raise GGMergeError(f"unknown reference engine {ref_engine!r} (forward, llama.cpp, auto)")
    if ref_engine == "llama.cpp" and not is_gguf_ref:
        raise GGMergeError("llama.cpp can run only a GGUF reference", path=ref_path)
    if not ref_path.exists():
        raise GGMergeError("no such reference model", path=ref_path)
    text = read_text(text_file)
    ids0, add_bos, bos, _ = tokenize_llamacpp(paths[0], text)
    ch = make_chunks(ids0, ctx=ctx, chunks=chunks, add_bos=add_bos, bos=bos, where=Path(text_file))
    same = {paths[0]: True}
    for p in paths[1:]:
        same[p] = tokenize_llamacpp(p, text)[0] == ids0
        if not same[p]:
            log.warning("%s tokenizes the text differently from %s; scored with %s's tokens",
                        p, paths[0], paths[0].name)
    n = ch.tokens.shape[0]
    src = open_source(ref_path) if ref_engine == "forward" else None
    layers = int(src.config().get("num_hidden_layers", 0)) + 2 if src is not None else 1
    ref_store = px.RefLogProbs(ch)
    results = []
    try:
        with steps(f"reference ({ref_engine}) over {n} chunks of {ctx}", n * layers) as bar:
            t0 = time.perf_counter()
            if src is not None:
                px.ref_with_forward_pass(src, ch, ref_store, advance=bar.advance)
            else:
                for i, logits in px.llamacpp_chunk_logits(ref_path, ch):
                    ref_store.put(i, logits)
                    bar.advance(1)
            ref_seconds = time.perf_counter() - t0
        for p in paths:
            t0 = time.perf_counter()
            kld, nll, top, kll, info = [], [], [], [], {}
            with steps(f"{p.name} over {n} chunks", n) as bar:
                for i, logits in px.llamacpp_chunk_logits(p, ch, info):
                    k, l, s, kl = px.score_chunk(ref_store, i, logits, ch.targets(i))
                    kld.append(k), nll.append(l), top.append(s), kll.append(kl)
                    bar.advance(1)
            fig = px.summary(px.Scores(np.stack(kld), np.stack(nll), np.stack(top), np.stack(kll)), ref_store.nll)
            results.append(TextVerdict(gguf=str(p), file_type=info["file_type"], tokens_match=same[p],
                                       seconds=time.perf_counter() - t0, **fig))
    finally:
        ref_store.close()
    report = {"reference": str(ref_path), "reference_engine": ref_engine, "text_file": str(text_file),
              "ctx": ctx, "chunks": n, "text_tokens": ch.n_text_tokens,
              "scored_tokens": int(ref_store.nll.size), "reference_seconds": ref_seconds,
              "results": [asdict(r) for r in results]}
    if as_json:
        print_json(report)
    else:
        _print_text_table(report, results)
    return report


def _print_text_table(report: dict, results: list[TextVerdict]) -> None:
    from rich.table import Table

    from .report import out

    r0 = results[0] if results else None
    title = (f"{report['reference']} ({report['reference_engine']}) vs llama.cpp: {report['text_file']}, "
             f"{report['chunks']} chunks × {report['ctx']}, {report['scored_tokens']} scored tokens")
    if r0 is not None:
        title += f"; reference PPL {r0.ref_ppl:.4f} ± {r0.ref_ppl_err:.4f}"
    t = Table(title=title)
    for c in ("GGUF", "type", "same tokens", "PPL", "ΔPPL", "KLD mean", "KLD median", "KLD p99", "KLD max",
              "same top-1", "KLD mean (llama-perplexity's estimate)"):
        t.add_column(c)
    for r in results:
        t.add_row(Path(r.gguf).name, r.file_type, "yes" if r.tokens_match else "NO",
                  f"{r.ppl:.4f} ± {r.ppl_err:.4f}", f"{r.delta_ppl:+.4f}", f"{r.kld_mean:.6f} ± {r.kld_err:.6f}",
                  f"{r.kld_median:.6f}", f"{r.kld_p99:.6f}", f"{r.kld_max:.6f}",
                  f"{100 * r.top1_agreement:.2f} %", f"{r.kld_mean_llama:.6f}")
    out.print(t)


def _file_type(p: Path) -> str:
    import gguf

    from .sources.gguf_data import field, open_reader

    ft = field(open_reader(p), "general.file_type")
    try:
        return gguf.LlamaFileType(int(ft)).name.replace("MOSTLY_", "") if ft is not None else "?"
    except ValueError:
        return str(ft)

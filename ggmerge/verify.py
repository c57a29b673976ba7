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


def verify(gguf: list[str], *, hf: str | None = None, text: str | None = None) -> list[Verdict]:
    from .prompts import SEED_PROMPT_TURN2
    from .report import out

    text = text or SEED_PROMPT_TURN2
    paths = [Path(g) for g in gguf]
    for p in paths:
        if not p.is_file():
            raise GGMergeError("no such GGUF file", path=p)
    hf_dir = Path(hf) if hf else default_hf_for(paths[0])
    ids, ref = hf_logits(hf_dir, text)
    results = []
    for p in paths:
        own_ids, got = gguf_logits(p, ids, text)
        top1, klm, klx, rel = compare(ref, got)
        results.append(Verdict(gguf=str(p), file_type=_file_type(p), tokens=len(ids),
                               tokens_match=list(own_ids) == list(ids), top1_agreement=top1,
                               kl_mean=klm, kl_max=klx, max_rel_logit_diff=rel))
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


def _file_type(p: Path) -> str:
    import gguf

    from .sources.gguf import field, open_reader

    ft = field(open_reader(p), "general.file_type")
    try:
        return gguf.LlamaFileType(int(ft)).name.replace("MOSTLY_", "") if ft is not None else "?"
    except ValueError:
        return str(ft)

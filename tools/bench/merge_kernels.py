"""The seed recipe's math for ONE tensor: ggmerge's method functions vs buffer-reusing formulations.

    python tools/bench/merge_kernels.py [--rows 5632 --cols 2048 --repeats 5]

run.py showed the merge pass is CPU-bound in the merge methods (py-spy: ~50 % of samples in
generalized_task_arithmetic, ~16 % in model_stock) and takes ~2x mergekit's page faults: every step
allocates fresh full-size float32 temporaries, and on Linux each allocation above glibc's mmap
threshold (<= 32 MiB) is a new mapping whose pages fault in one by one. This script evaluates the
seed's graph for one tensor twice, in the same process, alternating, and reports CPU time and minor
page faults per evaluation:

- ``ggmerge``: the package's own ``METHODS`` functions, as ``ggmerge.stream`` calls them;
- ``proposed``: the same formulas with
  (1) plain task arithmetic (no sparsify, no consensus) as ``out = base.clone(); out += w_i * (m_i - base)``
      with one scratch buffer, instead of stacking all deltas, scaling and summing the stack;
  (2) the shared partial ``Antler + 0.8 (Instruct - base)`` of the five task-arithmetic stages computed
      once (common-subexpression elimination across stages that have the same base and the same
      leading operands), then ``+ 0.8 (RP_k - base)`` per stage;
  (3) model_stock's pairwise cosines from one Gram pass over the offsets and the result as one fused
      ``base + t * (mean - base)``;
  (4) dare_ties with ONE model: TIES' sign election over a single model keeps exactly its non-zero
      entries, so the consensus mask, the stacked deltas and the divisor are skipped (the Bernoulli
      draw, the L1 rescale and the order of the float operations are unchanged).
The outputs are compared: they agree to well under one bf16 ulp of the tensor's largest value (a
different float32 summation order can flip the bf16 rounding of an intermediate here and there).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from ggmerge.methods import METHODS, seeded_generator

W_A, W_I, W_RP = 1.0, 0.8, 0.8


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def make_inputs(rows: int, cols: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g) / cols ** 0.5
    fine = lambda s: _bf16(base + s * base.std() * torch.randn(rows, cols, generator=g))
    return {"B": _bf16(base), "I": fine(0.02), "A": fine(0.04), "N": fine(0.03),
            **{f"RP{k}": fine(0.02) for k in range(4)}}


def ggmerge_graph(x: dict[str, torch.Tensor]) -> torch.Tensor:
    ta, ms, dt = METHODS["task_arithmetic"], METHODS["model_stock"], METHODS["dare_ties"]

    def call(m, base, models, mp, p, gen=None):
        mp, p = m.complete(mp, p, tensor="t")
        return m.fn(base, models, mp, p, gen)

    cv = _bf16(call(ta, x["B"], [x["A"], x["I"]], [{"weight": W_A}, {"weight": W_I}], {}))
    cvs = [_bf16(call(ta, x["B"], [x["A"], x["I"], x[f"RP{k}"]],
                      [{"weight": W_A}, {"weight": W_I}, {"weight": W_RP}], {})) for k in range(4)]
    stock = _bf16(call(ms, cv, [cv] + cvs, [{}] * 5, {}))
    return call(dt, x["N"], [stock], [{"density": 0.7, "weight": 0.5}], {}, seeded_generator(0, "t"))


def _ta_into(out: torch.Tensor, base: torch.Tensor, models, weights, tmp: torch.Tensor) -> torch.Tensor:
    for m, w in zip(models, weights):
        torch.sub(m, base, out=tmp)
        out.add_(tmp, alpha=w)
    return out


def _model_stock(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """Whole-tensor (not filter_wise) model_stock: the same t as ggmerge.methods.model_stock."""
    n = len(models)
    offsets = torch.stack([m.reshape(-1) for m in models]).sub_(base.reshape(1, -1))
    gram = offsets @ offsets.T                        # all dot products in one pass
    norms = gram.diagonal().sqrt()
    iu = torch.triu_indices(n, n, 1)
    cos = (gram[iu[0], iu[1]] / (norms[iu[0]] * norms[iu[1]]).clamp(min=1e-6)).clamp(-1, 1).mean()
    denom = 1 + (n - 1) * cos
    t = 0.0 if abs(float(denom)) < 1e-6 else float(n * cos / denom)
    # t * mean + (1 - t) * base == base + t * mean(offsets)
    return base + offsets.mean(dim=0).reshape(base.shape) * t


def proposed_graph(x: dict[str, torch.Tensor]) -> torch.Tensor:
    tmp = torch.empty_like(x["B"])
    shared = _ta_into(x["B"].clone(), x["B"], [x["A"], x["I"]], [W_A, W_I], tmp)   # Antler + 0.8 (I - B)
    cv = _bf16(shared)
    cvs = []
    for k in range(4):
        cvs.append(_bf16(_ta_into(shared.clone(), x["B"], [x[f"RP{k}"]], [W_RP], tmp)))
    stock = _bf16(_model_stock(cv, [cv] + cvs))
    return _dare_single(x["N"], stock, 0.7, 0.5, seeded_generator(0, "t"))


def _dare_single(base: torch.Tensor, model: torch.Tensor, density: float, weight: float,
                 gen: torch.Generator) -> torch.Tensor:
    """dare_ties (rescale on, normalize off: mergekit's defaults) for a single non-base model."""
    kept = model - base
    before = kept.abs().sum()
    kept.mul_(torch.bernoulli(torch.full_like(kept, density), generator=gen))   # same draw as sparsify.bernoulli
    after = kept.abs().sum()
    if before >= 1e-7 and after >= 1e-7:
        kept.mul_(before / after)
    return kept.mul_(weight).add_(base)


def measure(fn, x, repeats: int) -> tuple[float, float]:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    for _ in range(repeats):
        fn(x)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (time.process_time() - t0) / repeats, (r1.ru_minflt - r0.ru_minflt) / repeats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5632)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    x = make_inputs(a.rows, a.cols)
    ref, new = ggmerge_graph(x), proposed_graph(x)
    scale = float(ref.abs().max())
    print(f"tensor {a.rows}x{a.cols}; max |proposed - ggmerge| / max|x| = {float((ref - new).abs().max()) / scale:.2e}")
    rows = {"ggmerge": [], "proposed": []}
    for _ in range(3):   # alternate, so machine load hits both alike
        rows["ggmerge"].append(measure(ggmerge_graph, x, a.repeats))
        rows["proposed"].append(measure(proposed_graph, x, a.repeats))
    for name, rs in rows.items():
        cpu = sorted(r[0] for r in rs)[1]
        flt = sorted(r[1] for r in rs)[1]
        print(f"{name:9s} CPU {cpu * 1e3:8.1f} ms per tensor   minor faults {flt:9.0f}")
    g, p = (sorted(r[0] for r in rows[k])[1] for k in ("ggmerge", "proposed"))
    print(f"proposed / ggmerge CPU: {p / g:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

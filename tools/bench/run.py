"""ggmerge vs mergekit / convert_hf_to_gguf.py / llama.cpp quantize, side by side, plus the byte floor.

    python tools/bench/run.py --size quick --runs 3            # everything, table + BENCHMARKS.md
    python tools/bench/run.py --size 1b --runs 3 --only merge  # one pass

Passes (each tool measured as its own child by launch.py; runs interleaved anchor, ggmerge, floor so
that load changes hit all three alike; medians over --runs):
  merge     the seed recipe: ggmerge build (one multi-document recipe) vs mergekit-yaml stage by stage
  merge_multi  the same recipe file run by mergekit-multi in one process (mergekit's best case)
  outputs   the seed recipe to HF bf16 + Q8_0 + Q6_K + Q4_K_M: `ggmerge build --gguf …` (one command) vs
            the chain users run today (mergekit-multi, convert_hf_to_gguf.py, llama-quantize per type)
  outputs_steps  the same one command vs ggmerge's own two steps (`build`, then one `quantize` per type)
  convert   HF (Ninja-v1-RP, 3 shards) → BF16 GGUF: ggmerge convert vs convert_hf_to_gguf.py
  q4_k_m    BF16 GGUF (llama.cpp's) → Q4_K_M: ggmerge quantize vs llama_model_quantize (+ byte identity)
  q6_k      the same for Q6_K
Everything lives under /tmp/ggmerge-bench/SIZE (override with GGMERGE_BENCH_DIR); outputs of each run
are deleted once measured, except the files the next pass reads and the last outputs compared.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anchors
import report
from compare_gguf import compare
from make_models import NINJA, SIZES, make_models, n_params
from seed_recipe import ggmerge_recipe, mergekit_stages

log = logging.getLogger("bench")
PASSES = ["merge", "merge_multi", "outputs", "outputs_steps", "convert", "q4_k_m", "q6_k"]
#: the GGUF types a merge is published with in the `outputs` passes (beside the HF bf16 folder)
OUTPUT_TYPES = ["Q8_0", "Q6_K", "Q4_K_M"]
METRICS = ["wall", "cpu", "maxrss", "rss_anon", "rss_file", "rchar", "wchar", "read_bytes", "write_bytes", "minflt"]


class Bench:
    def __init__(self, size: str, runs: int, root: Path, cmdline: str = ""):
        self.size, self.runs, self.cmdline = size, runs, cmdline
        self.root = root / size
        self.models = self.root / "models"
        self.work = self.root / "work"
        self.logs = self.root / "logs"
        self.results: dict = {"size": size, "runs": runs, "params": n_params(SIZES[size]), "passes": {},
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine()}
        self._n = 0

    # ------------------------------------------------------------------ measuring
    def measure(self, tag: str, argv: list[str], env: dict | None = None) -> dict:
        """Run argv under launch.py as a fresh child; returns its record (rc != 0 → 'error' set).

        Every run gets an empty GGMERGE_CACHE: ggmerge caches input-file hashes there, and a user's
        first build of a recipe pays for hashing its inputs, so every measured build does too."""
        self._n += 1
        env = dict(env or anchors.child_env())
        cache = self.root / "ggmerge-cache"
        shutil.rmtree(cache, ignore_errors=True)
        env["GGMERGE_CACHE"] = str(cache)
        self.logs.mkdir(parents=True, exist_ok=True)
        out_json = self.logs / f"{self._n:03d}-{tag}.json"
        log_path = self.logs / f"{self._n:03d}-{tag}.log"
        load0 = os.getloadavg()[0]
        subprocess.run([sys.executable, str(anchors.HERE / "launch.py"), str(out_json), str(log_path), "--", *argv],
                       env=env, check=True)
        rec = json.loads(out_json.read_text())
        rec["load"] = (load0 + os.getloadavg()[0]) / 2
        if rec["rc"] != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-12:]
            rec["error"] = "\n".join(tail)
            log.warning("%s failed (rc %s): %s", tag, rec["rc"], tail[-1] if tail else "")
        else:
            log.info("%-28s %7.2f s wall %7.2f s cpu %8.1f MiB rss", tag, rec["wall"], rec["cpu"], rec["maxrss"] / 2**20)
        return rec

    def _record(self, pas: str, tool: str, rec: dict, cmd: str, extra: dict | None = None) -> None:
        cmd = cmd.replace(sys.executable, "python")   # what a reader types
        p = self.results["passes"].setdefault(pas, {})
        t = p.setdefault(tool, {"runs": [], "cmd": cmd})
        t["runs"].append(rec)
        if extra:
            t.update(extra)

    # ------------------------------------------------------------------ passes
    def merge(self) -> None:
        mk_bin = anchors.ensure_mergekit(anchors.CACHE)
        wdir = self.work / "merge"
        recipe = wdir / "seed.yaml"
        wdir.mkdir(parents=True, exist_ok=True)
        recipe.write_text(ggmerge_recipe(self.models))
        stages = mergekit_stages(self.models, wdir / "mergekit")
        for i, (name, text, _) in enumerate(stages):
            (wdir / f"mergekit-{i + 1}-{name}.yml").write_text(text)
        inputs = sorted(self.models.glob("*/*.safetensors"))
        gg_out = wdir / "ggmerge-out"
        mk_cmds = [anchors.mergekit_cmd(mk_bin, wdir / f"mergekit-{i + 1}-{name}.yml", out)
                   for i, (name, _, out) in enumerate(stages)]
        gg_cmd = anchors.ggmerge_cmd("build", str(recipe), "-o", str(gg_out), "--force")
        out_bytes = 0
        for r in range(self.runs):
            # mergekit: seven runs, intermediates on disk, as users of the seed do it
            per_stage = []
            for (name, _, out), cmd in zip(stages, mk_cmds):
                rec = self.measure(f"merge-mergekit-{name}", cmd)
                rec["stage"] = name
                per_stage.append(rec)
                if "error" in rec:
                    break
            final = stages[-1][2]
            out_bytes = _size(final.glob("*.safetensors")) or out_bytes
            agg = _aggregate(per_stage)
            self._record("merge", "anchor", agg, "\n".join(shlex.join(c) for c in mk_cmds),
                         {"name": "mergekit 0.1.5 (7 mergekit-yaml runs)"})
            self.results["passes"]["merge"]["anchor"].setdefault("stages", []).append(per_stage)
            for _, _, out in stages:
                shutil.rmtree(out, ignore_errors=True)
            rec = self.measure("merge-ggmerge", gg_cmd)
            gg_bytes = _size(gg_out.glob("*.safetensors"))
            out_bytes = out_bytes or gg_bytes
            self._record("merge", "ggmerge", rec, shlex.join(gg_cmd), {"name": "ggmerge build"})
            shutil.rmtree(gg_out, ignore_errors=True)
            self._floor("merge", inputs, out_bytes)
        self.results["passes"]["merge"]["io"] = {"in": _size(inputs), "out": out_bytes}

    def merge_multi(self) -> None:
        """mergekit's best case: mergekit-multi runs the same multi-document file in one process (it still
        writes each intermediate model to disk and reads it back)."""
        mk_bin = anchors.ensure_mergekit(anchors.CACHE)
        wdir = self.work / "merge_multi"
        recipe = wdir / "seed.yaml"
        wdir.mkdir(parents=True, exist_ok=True)
        recipe.write_text(ggmerge_recipe(self.models))
        inputs = sorted(self.models.glob("*/*.safetensors"))
        mk_out, inter, gg_out = wdir / "mergekit-out", wdir / "mergekit-intermediate", wdir / "ggmerge-out"
        mk_cmd = [str(mk_bin / "mergekit-multi"), str(recipe), "-I", str(inter), "--out-path", str(mk_out),
                  "--random-seed", "0"]
        gg_cmd = anchors.ggmerge_cmd("build", str(recipe), "-o", str(gg_out), "--force")
        out_bytes = 0
        for r in range(self.runs):
            rec = self.measure("merge_multi-mergekit", mk_cmd)
            out_bytes = _size(mk_out.glob("*.safetensors")) or out_bytes
            self._record("merge_multi", "anchor", rec, shlex.join(mk_cmd), {"name": "mergekit-multi 0.1.5"})
            shutil.rmtree(mk_out, ignore_errors=True)
            shutil.rmtree(inter, ignore_errors=True)
            rec = self.measure("merge_multi-ggmerge", gg_cmd)
            out_bytes = out_bytes or _size(gg_out.glob("*.safetensors"))
            self._record("merge_multi", "ggmerge", rec, shlex.join(gg_cmd), {"name": "ggmerge build"})
            shutil.rmtree(gg_out, ignore_errors=True)
            self._floor("merge_multi", inputs, out_bytes)
        self.results["passes"]["merge_multi"]["io"] = {"in": _size(inputs), "out": out_bytes}

    def outputs(self, steps: bool = False) -> None:
        """Every published output from sources: the one command against a multi-command path. Each
        path's commands run one after another and are measured as one (times and bytes add up)."""
        pas = "outputs_steps" if steps else "outputs"
        wdir = self.work / pas
        recipe = wdir / "seed.yaml"
        wdir.mkdir(parents=True, exist_ok=True)
        recipe.write_text(ggmerge_recipe(self.models))
        inputs = sorted(self.models.glob("*/*.safetensors"))
        hf = wdir / "two" / "Ninja-v1-RP-expressive"
        if steps:
            chain = [("build", anchors.ggmerge_cmd("build", str(recipe), "-o", str(hf), "--force"), None)]
            chain += [(f"quantize {t}", anchors.ggmerge_cmd("quantize", t, str(hf), "--force"), None)
                      for t in OUTPUT_TYPES]
            label = "ggmerge build + 3 × quantize"
        else:
            mk_bin = anchors.ensure_mergekit(anchors.CACHE)
            bf16 = wdir / "two" / "ninja.bf16.gguf"
            conv, conv_env = anchors.llama_convert_cmd(hf, bf16)
            chain = [("mergekit-multi", [str(mk_bin / "mergekit-multi"), str(recipe), "-I", str(wdir / "inter"),
                                         "--out-path", str(hf), "--random-seed", "0"], None),
                     ("convert_hf_to_gguf.py", conv, conv_env)]
            chain += [(f"llama-quantize {t}", anchors.llama_quantize_cmd(bf16, wdir / "two" / f"ninja.{t}.gguf", t),
                       None) for t in OUTPUT_TYPES]
            label = "mergekit-multi + convert_hf_to_gguf.py + 3 × llama-quantize"
        one = wdir / "one" / "Ninja-v1-RP-expressive"
        gg_cmd = anchors.ggmerge_cmd("build", str(recipe), "-o", str(one), "--force", "--gguf",
                                     ",".join(t.lower() for t in OUTPUT_TYPES))
        out_bytes = 0
        for r in range(self.runs):
            shutil.rmtree(wdir / "two", ignore_errors=True)
            shutil.rmtree(wdir / "inter", ignore_errors=True)
            per_step = []
            for name, cmd, env in chain:
                rec = self.measure(f"{pas}-{name.replace(' ', '-')}", cmd, env)
                rec["stage"] = name
                per_step.append(rec)
                if "error" in rec:
                    break
            self._record(pas, "anchor", _aggregate(per_step), "\n".join(shlex.join(c) for _, c, _ in chain),
                         {"name": label})
            self.results["passes"][pas]["anchor"].setdefault("stages", []).append(per_step)
            shutil.rmtree(wdir / "one", ignore_errors=True)
            rec = self.measure(f"{pas}-ggmerge", gg_cmd)
            outs = list((wdir / "one").glob("*.gguf")) + list(one.glob("*.safetensors"))
            out_bytes = _size(outs) or out_bytes
            self._record(pas, "ggmerge", rec, shlex.join(gg_cmd), {"name": "ggmerge build --gguf (one command)"})
            if steps and r == self.runs - 1:  # the one command's files against the two steps'
                same = {t: (wdir / "one" / f"Ninja-v1-RP-expressive.{t}.gguf").read_bytes()
                        == (wdir / "two" / f"Ninja-v1-RP-expressive.{t}.gguf").read_bytes()
                        for t in OUTPUT_TYPES}
                self.results["passes"][pas]["same_bytes"] = same
            self._floor(pas, inputs, out_bytes)
        self.results["passes"][pas]["io"] = {"in": _size(inputs), "out": out_bytes}

    def convert(self) -> None:
        src = self.models / NINJA
        wdir = self.work / "convert"
        wdir.mkdir(parents=True, exist_ok=True)
        inputs = sorted(src.glob("*.safetensors"))
        ref_out, gg_out = wdir / "llama.bf16.gguf", wdir / "ggmerge.bf16.gguf"
        ref_cmd, ref_env = anchors.llama_convert_cmd(src, ref_out)
        gg_cmd = anchors.ggmerge_cmd("convert", str(src), "-o", str(gg_out), "--outtype", "bf16", "--force")
        for r in range(self.runs):
            ref_out.unlink(missing_ok=True)
            gg_out.unlink(missing_ok=True)
            rec = self.measure("convert-llama.cpp", ref_cmd, ref_env)
            self._record("convert", "anchor", rec, "PYTHONPATH=" + shlex.quote(ref_env["PYTHONPATH"]) + " "
                         + shlex.join(ref_cmd), {"name": "convert_hf_to_gguf.py"})
            rec = self.measure("convert-ggmerge", gg_cmd)
            self._record("convert", "ggmerge", rec, shlex.join(gg_cmd), {"name": "ggmerge convert"})
            self._floor("convert", inputs, ref_out.stat().st_size if ref_out.exists() else 0)
        self._identity("convert", ref_out, gg_out)
        self.results["passes"]["convert"]["io"] = {"in": _size(inputs), "out": _size([ref_out])}
        gg_out.unlink(missing_ok=True)

    def quantize(self, qtype: str) -> None:
        pas = qtype.lower()
        src = self.work / "convert" / "llama.bf16.gguf"
        if not src.exists():   # the quantizers' input: llama.cpp's own BF16 GGUF of Ninja-v1-RP
            cmd, env = anchors.llama_convert_cmd(self.models / NINJA, src)
            subprocess.run(cmd, env=env, check=True, capture_output=True)
        wdir = self.work / pas
        wdir.mkdir(parents=True, exist_ok=True)
        ref_out, gg_out = wdir / f"llama.{qtype}.gguf", wdir / f"ggmerge.{qtype}.gguf"
        ref_cmd = anchors.llama_quantize_cmd(src, ref_out, qtype)
        gg_cmd = anchors.ggmerge_cmd("quantize", qtype, str(src), "-o", str(gg_out), "--force")
        for r in range(self.runs):
            ref_out.unlink(missing_ok=True)
            gg_out.unlink(missing_ok=True)
            rec = self.measure(f"{pas}-llama.cpp", ref_cmd)
            self._record(pas, "anchor", rec, shlex.join(ref_cmd), {"name": "llama_model_quantize (nthread 2)"})
            rec = self.measure(f"{pas}-ggmerge", gg_cmd)
            self._record(pas, "ggmerge", rec, shlex.join(gg_cmd), {"name": "ggmerge quantize"})
            self._floor(pas, [src], ref_out.stat().st_size if ref_out.exists() else 0)
        self._identity(pas, ref_out, gg_out)
        self.results["passes"][pas]["io"] = {"in": _size([src]), "out": _size([ref_out])}
        ref_out.unlink(missing_ok=True)
        gg_out.unlink(missing_ok=True)

    def _floor(self, pas: str, inputs: list[Path], out_bytes: int) -> None:
        tmp = self.work / pas / "floor.out"
        cmd = anchors.floor_cmd(tmp, out_bytes, inputs)
        rec = self.measure(f"{pas}-floor", cmd)
        self._record(pas, "floor", rec, f"python tools/bench/floor.py OUT {out_bytes} <{len(inputs)} input files>",
                     {"name": "read+write every byte once"})

    def _identity(self, pas: str, ref: Path, ours: Path) -> None:
        if not (ref.exists() and ours.exists()):
            self.results["passes"][pas]["identity"] = None
            return
        c = compare(ref, ours)
        self.results["passes"][pas]["identity"] = {
            "same_bytes": c.same_bytes, "tensors": c.tensors, "identical": c.identical,
            "differ": dict(list(c.differ.items())[:8]), "n_differ": len(c.differ),
            "only_llama": c.only_a, "only_ggmerge": c.only_b, "kv_differ": c.kv_differ}

    # ------------------------------------------------------------------ driver
    def run(self, only: list[str]) -> dict:
        t0 = time.time()
        make_models(self.size, self.models)
        for pas in only:
            log.info("== %s (%d runs)", pas, self.runs)
            meta = {"cmdline": self.cmdline, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": self.runs}
            if pas == "merge":
                self.merge()
            elif pas == "merge_multi":
                self.merge_multi()
            elif pas in ("outputs", "outputs_steps"):
                self.outputs(steps=pas == "outputs_steps")
            elif pas == "convert":
                self.convert()
            else:
                self.quantize(pas.upper())
            self.results["passes"][pas]["meta"] = meta
        self.results["elapsed"] = time.time() - t0
        self.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.results["machine"]["load_end"] = os.getloadavg()
        summarize(self.results)
        return self.results


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def _aggregate(stages: list[dict]) -> dict:
    """mergekit's seven runs as one measurement: times and bytes add up, the peak is the largest run's."""
    agg = {k: sum(s[k] for s in stages) for k in ("wall", "cpu", "user", "sys", "rchar", "wchar",
                                                   "read_bytes", "write_bytes", "minflt", "majflt")}
    for k in ("maxrss", "rss_anon", "rss_file"):
        agg[k] = max(s[k] for s in stages)
    agg["rc"] = next((s["rc"] for s in stages if s["rc"]), 0)
    agg["load"] = statistics.mean(s["load"] for s in stages)
    errs = [f"{s['stage']}: {s['error']}" for s in stages if "error" in s]
    if errs:
        agg["error"] = errs[0]
    return agg


def summarize(results: dict) -> None:
    """Median of every metric over the successful runs, per pass and tool."""
    for pas in results["passes"].values():
        for tool in ("anchor", "ggmerge", "floor"):
            t = pas.get(tool)
            if not t:
                continue
            ok = [r for r in t["runs"] if r["rc"] == 0]
            t["ok"] = len(ok)
            t["median"] = {k: statistics.median(r[k] for r in ok) for k in METRICS + ["load"]} if ok else None
            t["error"] = next((r["error"] for r in t["runs"] if "error" in r), None)
        if pas.get("anchor", {}).get("stages"):
            by_stage: dict[str, list] = {}
            for run in pas["anchor"]["stages"]:
                for s in run:
                    if s["rc"] == 0:
                        by_stage.setdefault(s["stage"], []).append(s)
            pas["anchor"]["stage_median"] = {
                name: {k: statistics.median(s[k] for s in recs) for k in METRICS} for name, recs in by_stage.items()}


def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpus": os.cpu_count(), "mem": mem, "load_start": os.getloadavg(), "python": sys.version.split()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--size", choices=["tiny", "quick", "1b"], default="quick")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=",".join(PASSES), help=f"comma-separated subset of {','.join(PASSES)}")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    ap.add_argument("--report-only", action="store_true", help="measure nothing: re-render SIZE/results.json")
    ap.add_argument("--benchmarks", type=Path, default=anchors.REPO / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.report_only:   # re-render the table and BENCHMARKS.md blocks from the saved results
        results = json.loads((anchors.CACHE / args.size / "results.json").read_text())
        report.print_table(results)
        if not args.no_write:
            report.update_benchmarks(args.benchmarks, results)
        return 0
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in only if p not in PASSES]
    if bad:
        ap.error(f"unknown pass {bad}; choose from {PASSES}")
    cmdline = "python tools/bench/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    bench = Bench(args.size, args.runs, anchors.CACHE, cmdline)
    results = bench.run(only)
    saved = bench.root / "results.json"
    if saved.exists():  # keep the passes not run this time, so BENCHMARKS.md shows every pass measured
        old = json.loads(saved.read_text())
        if old.get("params") == results["params"]:
            results["passes"] = {**{k: v for k, v in old["passes"].items() if k not in results["passes"]},
                                 **results["passes"]}
            results["passes"] = {k: results["passes"][k] for k in PASSES if k in results["passes"]}
    saved.write_text(json.dumps(results, indent=1, default=str) + "\n")
    report.print_table(results)
    if not args.no_write:
        report.update_benchmarks(args.benchmarks, results)
        log.info("updated %s", args.benchmarks)
    return 0


if __name__ == "__main__":
    sys.exit(main())

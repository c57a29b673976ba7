"""``ggmerge build``: run a recipe in one streaming pass and write the HF model.

    recipe (YAML) → sources → plan (every error found here) → Evaluator (per tensor) → HFWriter

The output folder (default ``out/<name>/`` beside the recipe) holds sharded bf16 safetensors,
config.json, generation_config.json, the merged tokenizer with its chat template, a model card with the
recipe, lineage and hashes, and ``ggmerge-build.json`` — the record ``ggmerge quantize`` and re-runs use.
"""
from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import __version__, procstats
from .errors import GGMergeError
from .fingerprint import combined, fingerprint, sha256_file
from .recipe.plan import Inputs, StageInfo, plan_recipe
from .recipe.schema import Recipe, load_recipe
from .sources import open_source
from .cpus import default_threads
from .evaluator import Evaluator

log = logging.getLogger(__name__)

RECORD = "ggmerge-build.json"


@dataclass
class Prepared:
    recipe: Recipe
    inputs: Inputs
    infos: list[StageInfo]
    leaf_paths: dict[str, Path]

    def close(self) -> None:
        for src in self.inputs.sources.values():
            src.close()


def output_folder(recipe: Recipe) -> Path:
    return recipe.path.resolve().parent / "out" / recipe.name


def prepare(recipe_path: str | os.PathLike = "ggmerge.yaml", *, offline: bool = True,
            strict: bool = False) -> Prepared:
    """Load, open and plan; raises GGMergeError for any problem before anything is written.
    ``strict``: keys and parameters mergekit ignores are errors, not warnings."""
    from .tokenizer.hf_vocab import read_hf

    recipe = load_recipe(recipe_path, strict=strict)
    root = recipe.path.resolve().parent
    if recipe.miniature:
        from .miniature import ensure_lineage

        ensure_lineage(root / recipe.miniature)
    sources, vocabs, paths = {}, {}, {}
    try:
        for ref in recipe.leaf_refs():
            local = Path(os.path.expanduser(ref))
            local = local if local.is_absolute() else root / local
            src = open_source(local if local.exists() else ref, offline=offline, root=root)
            sources[ref] = src
            paths[ref] = Path(src.path)
            tdir = src.tokenizer_dir()
            vocabs[ref] = read_hf(tdir) if tdir is not None else None
        inputs = Inputs(recipe, sources, vocabs)
        infos = plan_recipe(recipe, inputs)
    except BaseException:
        for s in sources.values():
            s.close()
        raise
    return Prepared(recipe, inputs, infos, paths)


def memory_estimate(p: Prepared, threads: int | None = None) -> int:
    """Peak anonymous memory of ``build`` for this plan, in bytes: this process as it is now (libraries
    imported, sources opened, tokenizers read: what the build holds before its pass) plus the worst
    moment of the pass, simulated in job order — ``threads`` consecutive tensors being evaluated and one
    being written (each with its caches and its output), or a streamed tensor in the main thread while
    the workers fill the look-ahead with finished results."""
    threads = default_threads() if threads is None else int(threads)
    out_info = p.infos[-1]
    itemsize = _itemsize(out_info.stage)
    ev = Evaluator(p.recipe, p.inputs)
    worst = 0
    window: list[int] = []
    for job in out_info.jobs.values():
        foot = ev.peak_bytes(job.name)
        if _numel(job.shape) >= STREAM_ELEMS:
            worst = max(worst, foot + LOOKAHEAD_BYTES + sum(window[-threads:]))
            continue
        window = (window + [foot + _numel(job.shape) * itemsize])[-(threads + 1):]
        worst = max(worst, sum(window))
    return procstats.rss_anon_file()[0] + worst


def describe(p: Prepared, threads: int | None = None) -> dict:
    """What ``--dry-run`` prints: stages, inputs, methods, tensor count, memory and disk estimates."""
    out_info = p.infos[-1]
    jobs = list(out_info.jobs.values())
    numel = [_numel(j.shape) for j in jobs]
    return {
        "name": p.recipe.name,
        "recipe": str(p.recipe.path),
        "stages": [
            {
                "name": i.stage.label,
                "method": i.stage.method.name,
                "base": i.stage.base,
                "models": [m.ref for m in i.stage.all_models()],
                "tokenizer": i.stage.tokenizer_source or "base model's",
                "tensors": len(i.jobs),
            }
            for i in p.infos
        ],
        "inputs": {ref: str(path) for ref, path in p.leaf_paths.items()},
        "output_tensors": len(jobs),
        "parameters": sum(numel),
        "vocab_size": out_info.config.get("vocab_size"),
        "disk_bytes": sum(n * _itemsize(out_info.stage) for n in numel),
        "peak_memory_bytes": memory_estimate(p, threads),
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(stage) -> int:
    import torch

    dt = stage.out_dtype or stage.dtype
    return torch.empty((), dtype=dt).element_size()


#: output tensors at least this large (elements) are streamed to the writer chunk by chunk, in turn,
#: instead of being evaluated ahead whole (a Llama-3 embedding is 525M elements)
STREAM_ELEMS = 1 << 27
#: finished output tensors that may wait for the writer (the pool runs ahead while a streamed one is written)
LOOKAHEAD_BYTES = 128 << 20


def evaluate_in_order(ev: Evaluator, jobs, dtype, *, threads: int | None = None, encode=None):
    """``(job, row blocks, payload)`` for every job, in order, while a pool of ``threads`` workers
    evaluates the next tensors ahead (torch and numba release the GIL). Row blocks are ``(r0, rows)``
    pairs, rounded to ``dtype``; ``payload`` is ``encode(name, tensor)`` computed in the worker (the
    GGUF encodings), None for a streamed tensor. Each tensor is evaluated single-threaded, so its bits
    never depend on the thread count. A large tensor is yielded as a lazy stream of row blocks evaluated
    when the writer asks for them, so it is never whole in memory."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from .buffers import POOL
    from .dtypes import round_to

    threads = default_threads() if threads is None else int(threads)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if threads < 1:
        raise GGMergeError(f"--threads must be at least 1, got {threads}", key="threads")

    def whole(name: str, shape):
        out = POOL.empty(shape, dtype)
        for r0, r1, rows in ev.chunks(name):
            out[r0:r1] = round_to(rows, dtype)
        return out, (encode(name, out) if encode is not None else None)

    def streamed(name: str):
        for r0, _, rows in ev.chunks(name):
            yield r0, round_to(rows, dtype)

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # the interpreter's long-lived objects (imported libraries, the plan) are never garbage: keep the
    # cyclic collector's periodic sweeps from walking them all again while the pass runs
    gc.freeze()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="ggmerge-eval")
    try:
        futures: dict[int, object] = {}
        ahead = 0
        pending = 0  # bytes of the results evaluated ahead, not yet written
        for i, job in enumerate(jobs):
            # run ahead by at least one tensor per worker, and further (while the writer or a streamed
            # tensor keeps the main thread busy) up to LOOKAHEAD_BYTES of finished results
            while ahead < len(jobs) and (ahead <= i + threads or pending < LOOKAHEAD_BYTES):
                nxt = jobs[ahead]
                if _numel(nxt.shape) < STREAM_ELEMS:
                    futures[ahead] = pool.submit(whole, nxt.name, tuple(nxt.shape))
                    pending += _numel(nxt.shape) * itemsize
                ahead += 1
            fut = futures.pop(i, None)
            if fut is None:
                yield job, streamed(job.name), None
                continue
            t, payload = fut.result()
            yield job, [(0, t)], payload
            pending -= _numel(job.shape) * itemsize
            POOL.give(t)  # written: its buffer serves a later tensor of the same size
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)
        gc.unfreeze()


def _to_gguf(outputs, job, blocks):
    """Pass a streamed tensor's row blocks on to the GGUF files on their way to the HF writer (or, for
    a tensor the GGUF stores permuted, gather it and encode it whole)."""
    import torch

    if outputs.rows_streamable(job.name):
        rows_total = job.shape[0]
        for r0, rows in blocks:
            outputs.put_rows(job.name, r0, rows, last=r0 + rows.shape[0] >= rows_total)
            yield r0, rows
        return
    whole = None
    for r0, rows in blocks:
        if whole is None:
            whole = torch.empty(tuple(job.shape), dtype=rows.dtype)
        whole[r0:r0 + rows.shape[0]] = rows
        yield r0, rows
    outputs.write(outputs.encode(job.name, whole))


def _gguf_state(record: dict, out: Path, types, imatrix: str | None = None) -> list:
    """The asked GGUF types whose file the build record lists as written by that build and that are still
    there unchanged (size and mtime), made with the same ``--imatrix`` (and after it changed last): the
    others must be (re)made."""
    from .quantize import quantized_path

    listed = record.get("gguf") or {}
    missing = []
    for ft in types:
        path = quantized_path(out, ft)
        entry = listed.get(path.name) or {}
        try:
            st = path.stat()
            fresh = entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
            fresh = fresh and entry.get("imatrix") == imatrix
            if fresh and imatrix is not None:
                fresh = Path(imatrix).stat().st_mtime_ns < st.st_mtime_ns
        except OSError:
            fresh = False
        if not fresh:
            missing.append(ft)
    return missing


def _gguf_entries(out: Path, hashes: dict[str, str], imatrix: str | None = None) -> dict[str, dict]:
    entries = {}
    for name, sha in hashes.items():
        st = (out.parent / name).stat()
        entries[name] = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if imatrix is not None:
            entries[name]["imatrix"] = imatrix
    return entries


def build(recipe: str = "ggmerge.yaml", output: str | None = None, *, dry_run: bool = False,
          force: bool = False, offline: bool = True, threads: int | None = None,
          hash_inputs: bool = False, strict: bool = False, gguf=None, no_hf: bool = False,
          imatrix: str | None = None) -> Path | None:
    """Run ``recipe`` and write the merged HF model and the asked GGUF files, all from one pass;
    returns the output folder (None for a dry run).

    ``gguf``: llama.cpp file types to write beside the HF folder (``"q4_k_m,q6_k"`` or a list; the
    recipe's ``ggmerge.gguf`` adds to it), each byte-identical to ``ggmerge quantize TYPE`` of the HF
    output; ``no_hf``: write only the GGUF files; ``imatrix``: an importance-matrix file for those
    (as ``ggmerge quantize TYPE --imatrix FILE``). ``threads``: tensors evaluated at once (default:
    every core this process may use); ``hash_inputs``: record full SHA-256s of input files not in the
    HF cache (default: sampled fingerprints, see :mod:`ggmerge.fingerprint`)."""
    from .writers.card import model_card
    from .writers.hf import HFWriter, hf_config
    from . import progress

    p = prepare(recipe, offline=offline, strict=strict)
    try:
        out = Path(output) if output else output_folder(p.recipe)
        types = []
        if gguf or p.recipe.gguf:  # (gguf-py is imported only when a GGUF is asked for)
            from .gguf_outputs import GGUFOutputs, parse_types

            try:
                types = parse_types(list(p.recipe.gguf) + parse_types(gguf))
            except GGMergeError as exc:
                raise GGMergeError(exc.message, key="gguf") from None
        if no_hf and not types:
            raise GGMergeError("--no-hf writes only GGUF files: name them with --gguf TYPE[,TYPE…]",
                               key="gguf")
        im = None
        if imatrix is not None:
            if not types:
                raise GGMergeError("--imatrix weights the GGUF quants: name them with --gguf TYPE[,TYPE…]",
                                   key="imatrix")
            from .quantize import load_imatrix_arg

            im = load_imatrix_arg(imatrix)
            imatrix = os.fspath(imatrix)
        if dry_run:
            from .report import print_plan
            print_plan(describe(p, threads), out)
            return None
        inputs_fp = {ref: fingerprint(path, full=hash_inputs) for ref, path in p.leaf_paths.items()}
        inputs_hash = combined({ref: combined(fp) for ref, fp in inputs_fp.items()})
        record = out / RECORD
        for ref, path in p.leaf_paths.items():
            rp, ro = Path(path).resolve(), out.resolve()
            if rp == ro or ro in rp.parents:
                raise GGMergeError(f"the output folder would replace the recipe's input model '{ref}'", path=out)
        if out.exists() and not force and not record.is_file() and not no_hf:
            raise GGMergeError("output already exists and is not a ggmerge build (use --force to replace it)",
                               path=out)
        if not force and not no_hf and record.is_file():
            try:
                prev = json.loads(record.read_text())
            except ValueError:
                prev = {}
            if prev.get("recipe_sha256") == p.recipe.sha256 and prev.get("inputs_sha256") == inputs_hash:
                missing = _gguf_state(prev, out, types, imatrix if im is not None else None)
                if not missing:
                    log.info("%s is up to date (same recipe and inputs); use --force to rebuild", out)
                    return out
                # the merge itself is done: make the new types from the HF output, in one read of it
                from .quantize import quantize_many

                log.info("%s is up to date; adding %s", out, ", ".join(ft.name for ft in missing))
                made = quantize_many(missing, out, imatrix=im, imatrix_arg=imatrix)
                prev.setdefault("gguf", {}).update(_gguf_entries(out, {m.name: sha256_file(m, cache={})
                                                                      for m in made},
                                                                 imatrix if im is not None else None))
                from .atomic import atomic_path

                with atomic_path(record) as tmp:
                    tmp.write_text(json.dumps(prev, indent=2) + "\n")
                return out
        info = p.infos[-1]
        stage = info.stage
        vocab = info.vocab
        if vocab is not None and stage.chat_template:
            vocab.chat_template = _template(stage.chat_template, p.recipe.path.parent, None)
        meta = {"ggmerge.version": __version__, "ggmerge.recipe_sha256": p.recipe.sha256,
                "ggmerge.inputs_sha256": inputs_hash}
        ev = Evaluator(p.recipe, p.inputs)
        jobs = ev.output_jobs()
        dtype = stage.out_dtype or stage.dtype
        total = sum(_numel(j.shape) for j in jobs) * _itemsize(stage)
        outputs = None
        if types:
            outputs = GGUFOutputs(types, out, {j.name: tuple(j.shape) for j in jobs}, hf_config(info.config, dtype),
                                  vocab, imatrix=im, imatrix_arg=imatrix)
        writer = None if no_hf else HFWriter(out, max_shard_bytes=p.recipe.shard_size, dtype=dtype, metadata=meta,
                                             layout=[(j.name, tuple(j.shape)) for j in jobs])
        try:
            what = ", ".join(([] if no_hf else ["HF"]) + [ft.name for ft in types])
            with progress.track(f"Merging {p.recipe.name} ({what})", total, len(jobs)) as bar:
                for job, blocks, payload in evaluate_in_order(ev, jobs, dtype, threads=threads,
                                                              encode=outputs.encode if outputs else None):
                    if payload:
                        outputs.write(payload)
                    elif outputs is not None and not isinstance(blocks, list):
                        blocks = _to_gguf(outputs, job, blocks)
                    if writer is not None:
                        writer.add_rows(job.name, tuple(job.shape), (t for _, t in blocks))
                    else:
                        for _ in blocks:
                            pass
                    bar.advance(_numel(job.shape) * _itemsize(stage), 1, job.name)
            ggufs = outputs.finish() if outputs is not None else {}
            if writer is None:
                return out
            gguf_entries = _gguf_entries(out, ggufs, imatrix if im is not None else None)

            def card_and_record(tmp: Path) -> dict[str, str]:
                # both carry the hashes of the finished shards, and are written inside the temporary
                # folder: the folder only appears at `out` complete with them
                outputs_ = {f.name: sha256_file(f, cache={}) for f in sorted(tmp.glob("*.safetensors"))}
                card = model_card(p.recipe.name, p.recipe.text, lineage=[str(x) for x in p.recipe.leaf_refs()],
                                  input_hashes={ref: combined(fp) for ref, fp in inputs_fp.items()},
                                  output_hashes={**outputs_, **ggufs})
                body = {
                    "name": p.recipe.name,
                    # relative paths keep the record identical when the same build runs elsewhere
                    "output": os.path.relpath(out.resolve(), p.recipe.path.resolve().parent),
                    "recipe": p.recipe.path.name,
                    "recipe_sha256": p.recipe.sha256,
                    "inputs_sha256": inputs_hash,
                    "inputs": inputs_fp,
                    "outputs": outputs_,
                    "seed": p.recipe.seed,
                    "ggmerge_version": __version__,
                }
                if gguf_entries:
                    body["gguf"] = gguf_entries
                return {"README.md": card, RECORD: json.dumps(body, indent=2) + "\n"}

            writer.finish(info.config, vocab, card_and_record)
        finally:
            if writer is not None:
                writer.abort()
            if outputs is not None:
                outputs.abort()
        return out
    finally:
        p.close()


def _template(spec: str, root: Path, resolve_template) -> str:
    """A recipe's ``chat_template``: already the template text — the recipe loader resolved the name,
    file or literal (and the planner ``auto``), so ``--dry-run`` fails on a bad one like a build."""
    return spec

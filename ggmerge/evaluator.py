"""The evaluator: the whole stage graph for one output tensor, computed in row chunks.

For each output tensor the evaluator builds the graph of values it depends on — one node per (model or
stage, tensor name) — and evaluates it chunk by chunk: rows ``[r0, r1)`` of every leaf are read,
every stage's method runs on those rows, and the output rows come out, with every temporary the size
of a chunk (about a megabyte, so it stays in the CPU cache and is recycled by the allocator instead of
being page-faulted in). Nothing intermediate touches the disk, and memory is set by the chunk size and
the graph's width, not by the largest tensor.

Most of a merge is elementwise (task arithmetic, linear, TIES' sign election, Model Stock's average),
so a chunk of the result needs only the same rows of the inputs. The rest needs a per-tensor statistic
first — Model Stock's norms and cosines, DARE's L1 norms for the rescale — which a first pass over the
chunks collects (in float64, over fixed chunk boundaries: the same bits whatever the thread count),
before the values are produced. Methods whose statistic is a whole-tensor selection (TIES/breadcrumbs
magnitude pruning, DELLA, SLERP, vocabulary remapping) are evaluated whole, exactly as written in
:mod:`ggmerge.methods`. A tensor that fits in one chunk is always evaluated whole, so small tensors give
exactly the bits of the reference formulas.

A value consumed by several passes is kept (in its exact compact dtype: bf16 for a bf16 source or a stage
rounded to bf16) when it fits the cache budget, else recomputed, re-reading its rows. DARE's masks are
drawn from the per-tensor generator in the same order as a whole-tensor draw, so chunking changes no bit
of them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .arch import served_name
from .buffers import POOL
from .dtypes import FLOAT_STORAGE
from .errors import GGMergeError
from .methods import Method, seeded_generator
from .methods import bernoulli, sparsify as sp
from .methods.model_stock import t_from_cosines
from .recipe.params import resolve_all
from .recipe.plan import Inputs, StageInfo, TensorJob
from .recipe.schema import Recipe, Stage

log = logging.getLogger(__name__)

#: elements per chunk (rows are never split): 1 MiB of float32, small enough for the CPU's cache
CHUNK_ELEMS = 1 << 18
#: bytes a tensor in flight may keep of values needed by more than one pass (beyond that: recompute)
CACHE_BUDGET = 256 << 20
#: the key of the output stage in the graph walk (it may have no name)
OUTPUT = "\0output"



def leaf_tensor_name(src, name: str) -> str:
    """The tensor a source serves for ``name`` (:func:`ggmerge.arch.served_name`: a model with tied
    embeddings serves its embedding as lm_head)."""
    return served_name(name, src.names())


def chunk_bounds(shape: tuple[int, ...], chunk_elems: int = CHUNK_ELEMS) -> list[tuple[int, int]]:
    """Row ranges of the chunks of a tensor of ``shape``: fixed by the shape alone (never by the thread
    count), whole rows, one chunk for 1-D or small tensors."""
    rows = shape[0] if shape else 1
    numel = math.prod(shape) if shape else 1
    if len(shape) < 2 or numel <= chunk_elems or rows <= 1:
        return [(0, rows)]
    per = max(1, chunk_elems // (numel // rows))
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


@dataclass(eq=False)
class _Node:
    ref: str
    name: str                     # tensor name in the ref's namespace
    shape: tuple[int, ...]
    info: StageInfo | None = None  # None for a leaf (a source tensor)
    operands: list["_Node"] = field(default_factory=list)
    mode: str = "whole"           # leaf | chunk | stats | whole
    dtype: torch.dtype = torch.float32  # the exact compact type of the value (what a cache stores)
    bounds: list[tuple[int, int]] = field(default_factory=list)
    # stage nodes
    job: TensorJob | None = None
    model_params: list[dict] | None = None
    params: dict | None = None
    gen_states: list | None = None  # per model: generator state where its draws start (DARE)
    stats: object = None
    prefix: dict | None = None     # task arithmetic: shared partial sums (see _Run._share_prefixes)
    # values
    cache: bool = False            # keep the whole value (compact) once computed
    full: torch.Tensor | None = None
    filled: int = 0                # chunks written into ``full`` so far
    consumers: int = 0

    @property
    def is_leaf(self) -> bool:
        return self.info is None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def stage_rounding(st: Stage) -> torch.dtype:
    """An intermediate stage is stored like a saved model: mergekit-multi saves it in its ``out_dtype``,
    else its ``dtype``."""
    return st.out_dtype or st.dtype


class Evaluator:
    """Evaluates output tensors of a planned recipe. Thread-safe: each :meth:`tensor` / :meth:`chunks`
    call has its own state, and sources read with positional reads."""

    def __init__(self, recipe: Recipe, inputs: Inputs, *, chunk_elems: int | None = None,
                 cache_budget: int | None = None):
        self.recipe = recipe
        self.inputs = inputs
        self.chunk_elems = int(chunk_elems or CHUNK_ELEMS)
        self.cache_budget = int(CACHE_BUDGET if cache_budget is None else cache_budget)

    # -- public -------------------------------------------------------------------------------
    def output_jobs(self) -> list[TensorJob]:
        return list(self._stage_info(OUTPUT).jobs.values())

    def tensor(self, name: str, stage: str | None = None) -> torch.Tensor:
        """Tensor ``name`` of the output stage (or of the named intermediate ``stage``), float32.
        The output stage's result is not yet rounded to the output dtype; the writer does that."""
        run = self._run(name, stage)
        try:
            if len(run.root.bounds) == 1 or run.root.mode == "whole":
                return run.checked(run.whole(run.root))
            out = torch.empty(run.root.shape, dtype=torch.float32)
            for r0, r1, t in run.chunks():
                out[r0:r1] = t
            return out
        finally:
            run.close()

    def chunks(self, name: str, stage: str | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Tensor ``name`` as ``(r0, r1, rows)`` in row order, float32: the whole tensor never needs to
        be in memory at once."""
        run = self._run(name, stage)
        try:
            if len(run.root.bounds) == 1 or run.root.mode == "whole":
                t = run.checked(run.whole(run.root))
                yield 0, t.shape[0] if t.dim() else 1, t
                return
            yield from run.chunks()
        finally:
            run.close()

    def peak_bytes(self, name: str) -> int:
        """The most memory the evaluation of ``name`` holds at once (caches, whole-evaluated values,
        kept masks, one chunk of every node): what ``--dry-run`` adds up for its memory estimate."""
        return self._run(name, None).footprint()

    # -- graph ---------------------------------------------------------------------------------
    def _stage_info(self, ref: str) -> StageInfo | None:
        st = self.recipe.output if ref == OUTPUT else self.recipe.stage(ref)
        return self.inputs.infos[st.label] if st is not None else None

    def _run(self, name: str, stage: str | None) -> "_Run":
        out = OUTPUT if stage is None else stage
        if stage is not None and self.recipe.stage(stage) is None:
            raise GGMergeError(f"no stage named '{stage}'", path=self.recipe.path)
        return _Run(self, out, name)


class _Run:
    """The state of one output tensor's evaluation."""

    def __init__(self, ev: Evaluator, out_ref: str, name: str):
        self.ev = ev
        self.nodes: dict[tuple[str, str], _Node] = {}
        self.root = self._node(out_ref, name)
        self.root.consumers += 1
        self._by_id = {id(n): n for n in self.nodes.values()}
        self._memo: dict[tuple[int, int], torch.Tensor] = {}
        self._lent: list[torch.Tensor] = []  # buffers of the pool, given back by close()
        self._plan_caches()
        self._share_prefixes()

    # -- building the graph --------------------------------------------------------------------
    def _node(self, ref: str, name: str) -> _Node:
        key = (ref, name)
        node = self.nodes.get(key)
        if node is not None:
            return node
        ev = self.ev
        info = ev._stage_info(ref)
        if info is None:
            src = ev.inputs.sources[ref]
            real = leaf_tensor_name(src, name)
            shape = tuple(int(d) for d in src.shape(real))
            node = _Node(ref, name, shape, mode="leaf", bounds=chunk_bounds(shape, ev.chunk_elems))
            storage = FLOAT_STORAGE.get(src.dtype(real).upper())
            node.dtype = storage if storage is not None else torch.float32
            if storage is None or not hasattr(src, "read_rows"):
                node.cache = True  # no row reads for this format (GGUF): load whole, once
        else:
            job = info.jobs[name]
            node = _Node(ref, name, tuple(job.shape), info=info, job=job,
                         bounds=chunk_bounds(tuple(job.shape), ev.chunk_elems))
            for op in job.operands:
                child = self._node(op.ref, op.tensor)
                child.consumers += 1
                node.operands.append(child)
            node.dtype = torch.float32 if ref == OUTPUT or info.stage is ev.recipe.output \
                else stage_rounding(info.stage)
            self._resolve_params(node)
            node.mode = self._mode(node)
        self.nodes[key] = node
        return node

    def _resolve_params(self, node: _Node) -> None:
        info, job = node.info, node.job
        st = info.stage
        method = st.method
        has_base = bool(job.operands) and job.operands[0].is_base
        ops = job.operands[1:] if has_base else job.operands
        # per-model settings are matched against that model's own tensor name (as mergekit does; it
        # differs from the output name only in slices with shifted layer ranges)
        mp = [resolve_all(method.model_params, (op.params, job.slice_params, st.params), job, op.tensor)
              for op in ops]
        p = resolve_all(method.params, (job.slice_params, st.params), job, job.name)
        try:
            node.model_params, node.params = method.complete(mp, p, tensor=node.name)
        except GGMergeError as exc:
            raise GGMergeError(f"stage '{st.label}': {exc.message}", path=self.ev.recipe.path,
                               tensor=node.name, key=exc.key) from None

    def _mode(self, node: _Node) -> str:
        """How a stage node is evaluated: 'chunk' (row-local), 'stats' (a statistics pass, then
        row-local), or 'whole'."""
        if len(node.bounds) == 1 or self._remaps(node):
            return "whole"
        if any(op.shape != node.shape for op in node.operands):
            return "whole"
        method: Method = node.info.stage.method
        name = method.name
        if name in ("linear", "passthrough"):
            return "chunk"
        if name == "model_stock":
            return "chunk" if node.params["filter_wise"] else "stats"
        if method.task_arithmetic:
            sparsify = method.sparsify
            dense = all(float(p["density"]) >= 1 for p in node.model_params)
            if sparsify is None or dense:
                return "chunk"
            if sparsify == "random":
                return "stats"
        return "whole"

    def _remaps(self, node: _Node) -> bool:
        """The node's token rows need remapping to the stage's vocabulary (a union that only renumbers
        nothing — every input already in the merged order, no padding — needs none)."""
        info = node.info
        if not node.job.vocab_rows or info.row_maps is None:
            return False
        if info.token_rows:
            return True
        return not all(_is_identity(info.row_maps[op.ref], op.shape[0], node.shape[0])
                       for op in node.operands)

    def _plan_caches(self) -> None:
        """Decide which values to keep whole. The evaluation is a sequence of loops over the chunks
        (a statistics pass per stats node, a pass per operand of a whole-evaluated node, the output
        pass); a value reached by more than one loop is kept (compact) when it fits the budget, nearest
        the output first, and recomputed by every loop otherwise."""
        order = self._topo()  # operands before consumers
        for node in order:
            if not node.is_leaf and node.mode == "whole":
                node.cache = True  # computed whole once, before the loops that read it
        budget = self.ev.cache_budget
        for node in reversed(order):  # consumers first: keeping one spares everything below it
            if node is self.root or node.cache or node.nbytes > budget:
                continue
            if self._loops_reaching(order).get(id(node), 0) > 1:
                node.cache = True
                budget -= node.nbytes

    def _loops_reaching(self, order: list[_Node]) -> dict[int, int]:
        """How many chunk loops read each node, given the current ``cache`` flags (a kept value is
        computed by the first loop that reaches it and read, not recomputed, by the later ones)."""
        loops: list[list[_Node]] = []
        for node in order:  # the order _prepare runs them in
            if node.is_leaf:
                continue
            if node.mode == "stats":
                loops.append(node.operands)
            elif node.mode == "whole":
                loops += [[op] for op in node.operands]
        loops.append([self.root])
        count: dict[int, int] = {}
        filled: set[int] = set()
        for drivers in loops:
            seen: set[int] = set()
            stack = list(drivers)
            while stack:
                n = stack.pop()
                if id(n) in seen:
                    continue
                seen.add(id(n))
                count[id(n)] = count.get(id(n), 0) + 1
                if n.is_leaf or n.mode == "whole" or id(n) in filled:
                    continue
                stack.extend(n.operands)
            filled |= {i for i in seen if self._by_id[i].cache}
        return count

    def _topo(self) -> list[_Node]:
        return _postorder(self.root, lambda n: n.operands)

    def _share_prefixes(self) -> None:
        """Task-arithmetic stages on the same base whose first models and weights agree (the seed's five
        chat-vector stages all start with Antler + 0.8·Instruct) compute that partial sum once per chunk:
        accumulated in the same order, it has the same bits in every stage."""
        keys: dict[tuple, int] = {}
        for node in self.nodes.values():
            for key in _prefix_keys(node):
                keys[key] = keys.get(key, 0) + 1
        for node in self.nodes.values():
            shared = [k for k in _prefix_keys(node) if keys[k] > 1]
            if shared:
                node.prefix = {len(k[1]): k for k in shared}

    def _empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        t = POOL.empty(shape, dtype)
        self._lent.append(t)
        return t

    def close(self) -> None:
        """Give the pool back every buffer this tensor's evaluation took (its caches)."""
        self._memo.clear()
        for node in self.nodes.values():
            node.full = node.stats = None
        for t in self._lent:
            POOL.give(t)
        self._lent.clear()

    def kept_bytes(self) -> int:
        """Bytes of the values kept whole across passes (in their compact dtypes)."""
        return sum(n.nbytes for n in self.nodes.values() if n.cache and n is not self.root)

    def footprint(self) -> int:
        """An estimate of the most bytes this evaluation holds at once: the kept values; for a value
        evaluated whole, its float32 operands and result while its method runs (one such at a time);
        DARE masks kept between passes (a byte an entry); every node's current chunk, twice over for
        the method's temporaries."""
        kept = self.kept_bytes()
        whole = 0
        masks = 0
        for n in self.nodes.values():
            numel = math.prod(n.shape)
            if not n.is_leaf and n.mode == "whole":
                whole = max(whole, 4 * (numel + sum(math.prod(op.shape) for op in n.operands)))
            if not n.is_leaf and n.mode == "stats" and n.info.stage.method.sparsify == "random" \
                    and n.params["rescale"] and numel * len(n.model_params) <= self.ev.cache_budget // 2:
                masks += numel * len(n.model_params)
        chunk = max(math.ceil(math.prod(n.shape) / len(n.bounds)) for n in self.nodes.values())
        return kept + whole + masks + 2 * 4 * chunk * len(self.nodes)

    # -- evaluation ----------------------------------------------------------------------------
    def chunks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        root = self.root
        self._prepare(root)
        for k, (r0, r1) in enumerate(root.bounds):
            self._memo.clear()
            yield r0, r1, self.checked(self._chunk(root, k))
        self._memo.clear()

    def checked(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (output values) if finite. A NaN or infinity in any input reaches the output (NaN·0 is
        NaN, so masks and zero weights keep it), so the inputs are checked here, on the one tensor
        that already passes by, and searched only when something is wrong."""
        if _finite(t):
            return t
        for node in self._topo():
            if node.is_leaf:
                src, real = self._leaf_source(node)
                if not _finite(src.load(real)):
                    raise GGMergeError("tensor contains NaN or infinity", path=src.path, tensor=real)
        raise GGMergeError("the merge produced NaN or infinity (no input has one): check the weights and "
                           "parameters of this tensor's stages", path=self.ev.recipe.path, tensor=self.root.name)

    def whole(self, node: _Node) -> torch.Tensor:
        """The whole value of ``node``, float32 (computed once; kept when the node is cached)."""
        if node.full is not None and node.filled >= len(node.bounds):
            return node.full if node.full.dtype == torch.float32 else node.full.float()
        if node.is_leaf:
            return self._load_leaf(node)
        if node.mode != "whole":
            self._prepare(node)
            out = torch.empty(node.shape, dtype=torch.float32)
            for k, (r0, r1) in enumerate(node.bounds):
                self._memo.clear()
                out[r0:r1] = self._chunk(node, k)
            self._memo.clear()
            return out
        values = [self.whole(op) for op in node.operands]
        t = self._apply(node, values)
        if node.cache:
            node.full, node.filled = (t if node.dtype == torch.float32 else t.to(node.dtype)), len(node.bounds)
        return t

    def _prepare(self, node: _Node) -> None:
        """Everything ``node``'s chunks need before the first one: whole-evaluated operands and the
        per-tensor statistics of every stats node below it, bottom-up (so no pass nests in another)."""
        for n in self._topo_from(node):
            if n.is_leaf:
                if n.cache and n.full is None:
                    self._load_leaf(n, widen=False)
            elif n.mode == "whole":
                if n.full is None:
                    self.whole(n)
            elif n.mode == "stats" and n.stats is None:
                self._collect_stats(n)

    def _topo_from(self, node: _Node) -> list[_Node]:
        """Nodes below ``node`` still to be prepared, operands first (a whole-evaluated node computes
        its own operands; a complete value needs nothing)."""
        def below(n: _Node) -> list[_Node]:
            return n.operands if (n.is_leaf or n.mode != "whole") else []

        return [n for n in _postorder(node, below) if not (n.full is not None and n.filled >= len(n.bounds))]

    def _chunk(self, node: _Node, k: int) -> torch.Tensor:
        """Rows of chunk ``k`` of ``node``, float32 (memoised for the current chunk)."""
        r0, r1 = node.bounds[k]
        if node.full is not None and (node.filled >= len(node.bounds) or node.mode == "whole"):
            part = node.full[r0:r1]
            return part if part.dtype == torch.float32 else part.float()
        key = (id(node), k)
        t = self._memo.get(key)
        if t is not None:
            return t
        compact = None
        if node.is_leaf:
            t = self._leaf_rows(node, k)
        else:
            t, compact = self._chunk_value(node, k)
        if node.cache:
            if node.full is None:
                node.full = self._empty(node.shape, node.dtype)
            node.full[r0:r1] = t if compact is None else compact
            node.filled += 1
        if node.consumers > 1:
            self._memo[key] = t
        return t

    # -- leaves --------------------------------------------------------------------------------
    def _leaf_source(self, node: _Node):
        src = self.ev.inputs.sources[node.ref]
        return src, leaf_tensor_name(src, node.name)

    def _load_leaf(self, node: _Node, widen: bool = True) -> torch.Tensor | None:
        """The whole leaf, float32 (None unless ``widen``); a cached leaf keeps it, in its storage dtype
        where rows can be read raw (a bf16 source stays bf16 in memory)."""
        src, real = self._leaf_source(node)
        if hasattr(src, "read_rows") and node.dtype != torch.float32:
            rows = node.shape[0] if node.shape else 1
            kept = src.read_rows(real, 0, rows, out=self._empty(node.shape, node.dtype))
            t = kept.float() if widen else None
        else:
            t = kept = src.load(real)
        if node.cache:
            node.full, node.filled = kept, len(node.bounds)
        return t

    def _leaf_rows(self, node: _Node, k: int) -> torch.Tensor:
        src, real = self._leaf_source(node)
        r0, r1 = node.bounds[k]
        raw = src.read_rows(real, r0, r1)
        return raw if raw.dtype == torch.float32 else raw.float()

    # -- stage values --------------------------------------------------------------------------
    def _split(self, node: _Node, values: list[torch.Tensor]):
        has_base = bool(node.job.operands) and node.job.operands[0].is_base
        return (values[0] if has_base else None), (values[1:] if has_base else values)

    def _apply(self, node: _Node, values: list[torch.Tensor]) -> torch.Tensor:
        """The stage's method on whole tensors, exactly as :mod:`ggmerge.methods` defines it."""
        from .tokenizer.union import remap_rows

        st, job = node.info.stage, node.job
        if self._remaps(node):
            maps = [node.info.row_maps[op.ref] for op in job.operands]
            anchor = st.base or job.operands[0].ref
            base_idx = next((i for i, op in enumerate(job.operands) if op.ref == anchor), 0)
            refs = [op.ref for op in job.operands]
            overrides = None
            if node.info.token_rows:
                missing = {src for _, src, _ in node.info.token_rows.values() if src is not None and src not in refs}
                if missing:
                    raise GGMergeError(f"tokenizer.tokens takes rows from '{sorted(missing)[0]}', which this "
                                       "tensor's merge does not read", path=self.ev.recipe.path, tensor=node.name)
                overrides = {j: (force, None if src is None else refs.index(src), row)
                             for j, (force, src, row) in node.info.token_rows.items()}
            values = remap_rows(values, maps, base_idx, pad_to_multiple_of=st.pad_to_multiple_of,
                                overrides=overrides)
        base, models = self._split(node, values)
        gen = seeded_generator(self.ev.recipe.seed, f"{st.label}/{node.name}") if st.method.uses_random else None
        out = self._call(node, lambda: st.method.fn(base, models, node.model_params, node.params, gen))
        return self._round(node, out)[0]

    def _round(self, node: _Node, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The value as float32, and (for an intermediate stage) in its own dtype: a stage is a model
        in its own right, stored in its dtype, so it is rounded like a saved model."""
        if node.dtype == torch.float32:
            return out, None
        compact = out.to(node.dtype)
        return compact.float(), compact

    def _call(self, node: _Node, fn):
        st = node.info.stage
        try:
            return fn()
        except GGMergeError as exc:
            raise GGMergeError(f"stage '{st.label}': {exc.message}", path=self.ev.recipe.path,
                               tensor=node.name, key=exc.key) from None
        except (RuntimeError, ValueError) as exc:
            raise GGMergeError(f"stage '{st.label}' ({st.method.name}) failed: {exc}", path=self.ev.recipe.path,
                               tensor=node.name) from exc

    def _chunk_value(self, node: _Node, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        method = node.info.stage.method
        base, models = self._split(node, [self._chunk(op, k) for op in node.operands])
        if method.name == "model_stock" and node.mode == "stats":
            t = node.stats
            out = self._call(node, lambda: _model_stock_apply(base, models, t))
        elif method.task_arithmetic:
            out = self._call(node, lambda: self._task_arithmetic(node, k, base, models))
        else:
            out = self._call(node, lambda: method.fn(base, models, node.model_params, node.params, None))
        return self._round(node, out)

    def _task_arithmetic(self, node: _Node, k: int, base, models) -> torch.Tensor:
        method = node.info.stage.method
        kw: dict = {}
        if node.mode == "stats":  # DARE: this chunk's masks, from each model's own generator
            if k == 0:  # every pass over the chunks draws the same masks again
                node.stats["gens"] = [_gen_at(s) for s in node.stats["states"]]
            gens, ratios, masks = node.stats["gens"], node.stats["ratios"], node.stats["masks"]
            kw["sparsifier"] = lambda i, d: _dare_chunk(d, node.model_params[i], gens[i], ratios[i],
                                                        masks[i][k] if masks[i] else None)
        if node.prefix:
            start = None
            for j in sorted(node.prefix, reverse=True):
                got = self._memo.get(("prefix", node.prefix[j], k))
                if got is not None:
                    start = (j, got.clone())
                    break
            wanted = {j: key for j, key in node.prefix.items() if start is None or j > start[0]}

            def keep(j: int, mixed: torch.Tensor) -> None:
                if j in wanted:
                    self._memo[("prefix", wanted[j], k)] = mixed.clone()

            kw["partial"], kw["on_partial"] = start, keep
        return method.fn(base, models, node.model_params, node.params, None, **kw)

    # -- statistics ----------------------------------------------------------------------------
    def _collect_stats(self, node: _Node) -> None:
        method = node.info.stage.method
        if method.name == "model_stock":
            node.stats = self._model_stock_stats(node)
        else:
            node.stats = self._dare_stats(node)

    def _model_stock_stats(self, node: _Node) -> torch.Tensor:
        n = len(node.operands) - 1
        gram = torch.zeros((n, n), dtype=torch.float64)
        for k in range(len(node.bounds)):
            self._memo.clear()
            values = [self._chunk(op, k) for op in node.operands]
            base, models = values[0], values[1:]
            offsets = torch.stack([(m - base).reshape(-1) for m in models])
            gram += (offsets @ offsets.T).double()
        self._memo.clear()
        norms = gram.diagonal().sqrt().float()
        dots = gram.float()
        return model_stock_t_from_gram(norms, dots)

    def _dare_stats(self, node: _Node) -> dict:
        """Per model: the generator state its mask draws start from (a whole-tensor draw takes the models
        one after another), and the L1 rescale factor ‖δ‖₁ / ‖δ ⊙ mask‖₁ over the whole tensor."""
        st = node.info.stage
        gen = seeded_generator(self.ev.recipe.seed, f"{st.label}/{node.name}")
        numel = math.prod(node.shape)
        states = []
        for i, p in enumerate(node.model_params):
            states.append(gen.get_state())
            if i + 1 < len(node.model_params) and float(p["density"]) < 1:
                bernoulli.skip(gen, numel)  # past this model's draws
        rescale = bool(node.params["rescale"])
        ratios: list = [None] * len(node.model_params)
        # the masks drawn here are kept for the value pass when they fit (one byte per entry)
        keep = rescale and numel * len(node.model_params) <= self.ev.cache_budget // 2
        masks: list[list[torch.Tensor]] = [[] for _ in node.model_params]
        if rescale:
            gens = [_gen_at(s) for s in states]
            before = [0.0] * len(gens)
            after = [0.0] * len(gens)
            for k in range(len(node.bounds)):
                self._memo.clear()
                values = [self._chunk(op, k) for op in node.operands]
                base, models = self._split(node, values)
                for i, (m, p) in enumerate(zip(models, node.model_params)):
                    if float(p["density"]) >= 1:
                        continue
                    d = (m - base).abs_()
                    mask = bernoulli.bernoulli_mask(d.shape, float(p["density"]), gens[i])
                    before[i] += float(d.sum(dtype=torch.float64))
                    after[i] += float((d.mul_(mask)).sum(dtype=torch.float64))
                    if keep:
                        masks[i].append(mask)
            self._memo.clear()
            for i in range(len(ratios)):
                b = torch.tensor(before[i], dtype=torch.float32)
                a = torch.tensor(after[i], dtype=torch.float32)
                if not (b < sp.RESCALE_EPS or a < sp.RESCALE_EPS):
                    ratios[i] = b / a
        return {"states": states, "ratios": ratios, "gens": None, "masks": masks}


def _postorder(root: _Node, children) -> list[_Node]:
    """Every node reachable from ``root`` through ``children(node)``, each after its children
    (iterative: no recursive closure keeping the graph alive in a reference cycle)."""
    order: list[_Node] = []
    seen: set[int] = set()
    stack: list[tuple[_Node, bool]] = [(root, False)]
    while stack:
        n, expanded = stack.pop()
        if expanded:
            order.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.append((n, True))
        for c in reversed(children(n)):
            if id(c) not in seen:
                stack.append((c, False))
    return order


def _is_identity(row_map, rows_in: int, rows_out: int) -> bool:
    import numpy as np

    m = np.asarray(row_map)
    return rows_in == rows_out == len(m) and bool(np.array_equal(m, np.arange(len(m))))


def _gen_at(state) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.set_state(state)
    return g


def _dare_chunk(delta: torch.Tensor, p: dict, gen: torch.Generator, ratio, mask=None) -> torch.Tensor:
    """DARE on one chunk: the mask drawn from the model's generator (or kept from the statistics pass;
    a bool mask multiplies as 0.0/1.0, the same bits), the whole tensor's L1 factor."""
    density = float(p["density"])
    if density >= 1:
        return delta
    if mask is None:
        mask = bernoulli.bernoulli_mask(delta.shape, density, gen)
    masked = delta * mask
    return masked if ratio is None else masked * ratio


def model_stock_t_from_gram(norms: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
    """Model Stock's t from the offsets' norms and pairwise dot products (the same steps as
    :func:`ggmerge.methods.model_stock.model_stock_t`)."""
    n = norms.shape[0]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            cosines.append((dots[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    return t_from_cosines(cosines, n)


def _model_stock_apply(base: torch.Tensor, models: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    average = sum(models) / len(models)
    return t * average + (1 - t) * base


def _finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or not t.numel():
        return True
    # one reduction pass, no bool temporary: NaN propagates through min/max, ±inf shows as itself
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def _prefix_keys(node: _Node) -> list[tuple]:
    """Keys of the partial sums a task-arithmetic chunk builds: (base, ((model, weight), …)) for
    each leading run of models, when the stage sums plain weighted deltas in model order."""
    if node.is_leaf or node.mode != "chunk" or not node.info.stage.method.task_arithmetic:
        return []
    method = node.info.stage.method
    if method.consensus is not None or not node.job.operands or not node.job.operands[0].is_base:
        return []
    base = id(node.operands[0])
    models = node.operands[1:]
    terms = tuple((id(m), float(torch.tensor(float(p["weight"]), dtype=torch.float32)))
                  for m, p in zip(models, node.model_params))
    return [(base, terms[:j]) for j in range(1, len(terms))]

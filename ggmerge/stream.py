"""The streaming pass: evaluate the whole stage graph for one output tensor at a time.

For each tensor of the output stage we walk the graph of stages down to the source files, load the
source tensors it needs (memory-mapped, one at a time), run each stage's merge method, and hand the
result to a writer. Nothing intermediate touches the disk. A value that several stages need (the seed's
base model feeds four chat-vector stages) is loaded once and dropped as soon as its last consumer has
run, so memory is bounded by the tensors in flight for one output tensor, not by the model.
"""
from __future__ import annotations

import logging
from collections import Counter
import torch

from .errors import GGMergeError
from .methods import PARAM_KINDS, seeded_generator
from .recipe.params import resolve
from .recipe.plan import Inputs, StageInfo, TensorJob
from .recipe.schema import Recipe

log = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, recipe: Recipe, inputs: Inputs):
        self.recipe = recipe
        self.inputs = inputs
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._uses: Counter = Counter()
        #: most bytes held in the cache of values awaiting a later consumer (for the memory report)
        self.peak_cache_bytes = 0

    # -- public -------------------------------------------------------------------------------
    def output_jobs(self) -> list[TensorJob]:
        return list(self._stage_info(_OUTPUT).jobs.values())

    def tensor(self, name: str, stage: str | None = None) -> torch.Tensor:
        """Tensor ``name`` of the output stage (or of the named intermediate ``stage``), float32.
        The output stage's result is not yet rounded to the output dtype; the writer does that."""
        out = _OUTPUT if stage is None else stage
        if stage is not None and self.recipe.stage(stage) is None:
            raise GGMergeError(f"no stage named '{stage}'", path=self.recipe.path)
        self._uses.clear()
        self._count(out, name)
        try:
            return self._value(out, name)
        finally:
            self._cache.clear()

    # -- graph walk ---------------------------------------------------------------------------
    def _stage_info(self, ref: str) -> StageInfo | None:
        st = self.recipe.output if ref == _OUTPUT else self.recipe.stage(ref)
        return self.inputs.infos[st.label] if st is not None else None

    def _count(self, ref: str, name: str) -> None:
        """Count how many times each (ref, tensor) value will be consumed for this output tensor."""
        key = (ref, name)
        self._uses[key] += 1
        if self._uses[key] > 1:
            return  # its own inputs were counted on first visit; it is computed once
        info = self._stage_info(ref)
        if info is None:
            return
        for op in info.jobs[name].operands:
            self._count(op.ref, op.tensor)

    def _value(self, ref: str, name: str) -> torch.Tensor:
        key = (ref, name)
        if key in self._cache:
            t = self._cache[key].float()
        else:
            info = self._stage_info(ref)
            t = self._load(ref, name) if info is None else self._merge(info, name)
            if self._uses[key] > 1:
                # kept for a later consumer; a value that is exactly bf16 (a bf16 source tensor, or a
                # stage rounded to bf16 like a saved model) is kept at half the size and widened on use
                self._cache[key] = t.to(torch.bfloat16) if self._exact_bf16(ref, name, info) else t
                self._note_memory()
        self._uses[key] -= 1
        if self._uses[key] <= 0:
            self._cache.pop(key, None)
        return t

    def _exact_bf16(self, ref: str, name: str, info: StageInfo | None) -> bool:
        if info is not None:
            return info.stage is not self.recipe.output and info.stage.dtype == torch.bfloat16
        src = self.inputs.sources[ref]
        real = name if name in src.names() else "model.embed_tokens.weight"
        return src.dtype(real) == "BF16"

    def _note_memory(self) -> None:
        n = sum(t.numel() * t.element_size() for t in self._cache.values())
        self.peak_cache_bytes = max(self.peak_cache_bytes, n)

    def _load(self, ref: str, name: str) -> torch.Tensor:
        src = self.inputs.sources[ref]
        real = name
        if name == "lm_head.weight" and name not in src.names():
            real = "model.embed_tokens.weight"  # tied embeddings
        t = src.load(real)
        # one reduction pass, no bool temporary: NaN propagates through min/max, ±inf shows as itself
        lo, hi = torch.aminmax(t) if t.numel() else (torch.zeros(()), torch.zeros(()))
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise GGMergeError("tensor contains NaN or infinity", path=src.path, tensor=real)
        return t

    def _merge(self, info: StageInfo, name: str) -> torch.Tensor:
        from .tokenizer.union import remap_rows

        st = info.stage
        job = info.jobs[name]
        values = [self._value(op.ref, op.tensor) for op in job.operands]
        if job.vocab_rows and info.row_maps is not None:
            maps = [info.row_maps[op.ref] for op in job.operands]
            anchor = st.base or job.operands[0].ref
            base_idx = next((i for i, op in enumerate(job.operands) if op.ref == anchor), 0)
            values = remap_rows(values, maps, base_idx, pad_to_multiple_of=st.pad_to_multiple_of)
        has_base = bool(job.operands) and job.operands[0].is_base
        method = st.method
        base_t = values[0] if has_base else None
        models = values[1:] if has_base else values
        ops = job.operands[1:] if has_base else job.operands
        # per-model settings are matched against that model's own tensor name (as mergekit does; it
        # differs from the output name only in slices with shifted layer ranges)
        model_params = [self._resolve_all(method.model_params, (op.params, job.slice_params, st.params), job,
                                          op.tensor) for op in ops]
        params = self._resolve_all(method.params, (job.slice_params, st.params), job, job.name)
        gen = seeded_generator(self.recipe.seed, f"{st.label}/{name}") if method.uses_random else None
        try:
            model_params, params = method.complete(model_params, params, tensor=name)
            out = method.fn(base_t, models, model_params, params, gen)
        except GGMergeError as exc:
            raise GGMergeError(f"stage '{st.label}': {exc.message}", path=self.recipe.path, tensor=name,
                               key=exc.key) from None
        except (RuntimeError, ValueError) as exc:
            raise GGMergeError(f"stage '{st.label}' ({method.name}) failed: {exc}", path=self.recipe.path,
                               tensor=name) from exc
        if st is not self.recipe.output:
            # an intermediate stage is a model in its own right, stored in its dtype: round like a saved model
            out = out.to(st.dtype).float()
        return out

    def _resolve_all(self, spec: dict, chain: tuple[dict, ...], job: TensorJob, tensor: str) -> dict:
        """Per-tensor value of every parameter in ``spec``: the first of ``chain`` (model entry, then
        slice, then the stage's ``parameters``) whose setting applies to this tensor — a filter list that
        matches nothing falls through to the next, as in mergekit — else the method's default."""
        out = {}
        for key, default in spec.items():
            value = None
            for c in chain:
                if key in c:
                    value = resolve(c[key], tensor, job.layer, job.span, kind=PARAM_KINDS.get(key), key=key)
                    if value is not None:
                        break
            out[key] = default if value is None else value
        return out


#: the key of the output stage in the graph walk (it may have no name)
_OUTPUT = "\0output"

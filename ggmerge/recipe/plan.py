"""Plan: from a validated recipe and opened sources to one job per output tensor.

Everything that can be wrong with the inputs — a missing tensor, shapes that disagree, vocabularies
of different sizes without a tokenizer strategy, layer ranges past the end of a model — is found
here, before the first byte is written, and reported with the file and tensor.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..arch import TIED_HEAD, Family, family_for, served_name
from ..dtypes import FLOAT_STORAGE
from ..errors import GGMergeError, raise_all
from ..tokenizer.vocab import Vocab
from .params import resolve_all
from .schema import ModelInput, Recipe, Stage

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


@dataclass
class Operand:
    """One input of a tensor job: which model/stage, which of its tensors, with which raw parameters."""
    ref: str
    tensor: str
    params: dict
    is_base: bool = False


@dataclass
class TensorJob:
    name: str                       # output tensor name in the stage's namespace
    shape: tuple[int, ...]
    operands: list[Operand]
    slice_params: dict              # slice-level parameter overrides (slices form)
    layer: int | None               # index within the slice (for gradients)
    span: int                       # number of layers in the slice
    vocab_rows: bool = False        # indexed by token id (remapped by the stage's tokenizer)


@dataclass
class StageInfo:
    stage: Stage
    config: dict
    vocab: Vocab | None
    #: per input ref: merged-id → that input's row (or -1); None when no remapping is needed
    row_maps: dict[str, np.ndarray] | None
    jobs: dict[str, TensorJob] = field(default_factory=dict)
    #: the architecture family (names, vocab tensors, post tensors): :mod:`ggmerge.arch`
    family: Family | None = None
    #: ``tokenizer.tokens``: merged id → (force, source ref or None for a zero row, source row)
    token_rows: dict[int, tuple[bool, str | None, int | None]] | None = None

    @property
    def tensor_names(self) -> list[str]:
        return list(self.jobs)


class Inputs:
    """Lazy access to what stages read: opened sources for model references, StageInfo for stages."""

    def __init__(self, recipe: Recipe, sources: dict, vocabs: dict[str, Vocab | None]):
        self.recipe = recipe
        self.sources = sources          # ref -> TensorSource
        self.vocabs = vocabs            # ref -> Vocab (leaf refs)
        self.infos: dict[str, StageInfo] = {}

    def is_stage(self, ref: str) -> bool:
        return self.recipe.stage(ref) is not None

    def info(self, ref: str) -> StageInfo:
        return self.infos[self.recipe.stage(ref).label]

    def where(self, ref: str) -> str:
        return f"stage '{self.recipe.stage(ref).label}'" if self.is_stage(ref) else str(self.sources[ref].path)

    def names(self, ref: str) -> list[str]:
        if self.is_stage(ref):
            return self.info(ref).tensor_names
        return list(self.sources[ref].names())

    def has(self, ref: str, name: str) -> bool:
        """``name`` can be read from ``ref``; a tied model serves lm_head from its embedding."""
        names = set(self.names(ref))
        if name in names:
            return True
        head, embed = TIED_HEAD
        return (name == head and embed in names and not self.is_stage(ref)
                and bool(self.sources[ref].config().get("tie_word_embeddings")))

    def shape(self, ref: str, name: str) -> tuple[int, ...]:
        if self.is_stage(ref):
            return self.info(ref).jobs[name].shape
        src = self.sources[ref]
        return tuple(src.shape(served_name(name, src.names())))

    def config(self, ref: str) -> dict:
        return self.info(ref).config if self.is_stage(ref) else self.sources[ref].config()

    def vocab(self, ref: str) -> Vocab | None:
        return self.info(ref).vocab if self.is_stage(ref) else self.vocabs.get(ref)


def plan_recipe(recipe: Recipe, inputs: Inputs) -> list[StageInfo]:
    """Plan every stage (dependencies first). Problems of parameter values that only show per tensor
    (DELLA's density ± epsilon) are collected over all stages and raised together."""
    problems: list[GGMergeError] = []
    for st in recipe.stages:
        if st.dtype is None:
            st.dtype = _input_dtype(st, inputs)
        info = plan_stage(st, inputs)
        inputs.infos[st.label] = info
        _plan_template(info, inputs)
        problems += _check_della(st, info, recipe.path)
    raise_all(problems, log)
    return [inputs.infos[s.label] for s in recipe.stages]


#: stored safetensors dtypes a model can be kept in
#: dtype when a recipe gives none and no input tells (GGUF inputs: mergekit cannot read them)
DEFAULT_DTYPE = torch.bfloat16


def _input_dtype(st: Stage, inputs: Inputs) -> torch.dtype:
    """A stage without ``dtype:`` computes and saves in its inputs' dtype in mergekit (tensors are
    loaded as stored and never cast), so float16 models give a float16 merge. A model's dtype is the
    one most of its elements are stored in (some keep norms in F32); a stage input is its saved dtype.
    Inputs that disagree give the base's (else the first model's), which is what mergekit's
    task-arithmetic family casts its result to. GGUF inputs do not count; with none left, bfloat16."""
    found: dict[str, torch.dtype] = {}
    for ref in st.inputs():
        if inputs.is_stage(ref):
            dep = inputs.recipe.stage(ref)
            found[ref] = dep.out_dtype or dep.dtype
        else:
            dt = _source_dtype(inputs.sources.get(ref))
            if dt is not None:
                found[ref] = dt
    if not found:
        return DEFAULT_DTYPE
    kinds = set(found.values())
    if len(kinds) == 1:
        return kinds.pop()
    anchor = st.base or st.all_models()[0].ref
    who = anchor if anchor in found else next(iter(found))
    log.info("stage '%s' has no dtype: its inputs are stored in %s; using %s, as '%s' is", st.label,
             ", ".join(sorted(str(d).replace("torch.", "") for d in kinds)),
             str(found[who]).replace("torch.", ""), who)
    return found[who]


def _source_dtype(src) -> torch.dtype | None:
    from ..sources.safetensors import SafetensorsSource

    src = getattr(src, "inner", src)  # model+lora: the model's dtype (PEFT merges in it)
    if not isinstance(src, SafetensorsSource):
        return None
    counts: dict[torch.dtype, int] = {}
    for name in src.names():
        dt = FLOAT_STORAGE.get(src.dtype(name))
        if dt is not None:
            counts[dt] = counts.get(dt, 0) + int(np.prod(src.shape(name), dtype=np.int64))
    if not counts:
        return None
    # ties (an odd model) go to the wider type, which loses nothing
    width = {torch.float32: 2, torch.bfloat16: 1, torch.float16: 0}
    return max(counts, key=lambda d: (counts[d], width[d]))


def _plan_template(info: StageInfo, inputs: Inputs) -> None:
    """The stage's chat template goes into its vocabulary (a copy: a leaf's vocabulary is shared), so a
    later stage reading this one sees it, as mergekit-multi's saved stage tokenizers carry it.
    ``auto`` takes the template most of the stage's inputs have (base first on a tie), through the
    stage graph: a stage input offers the template its own plan gave it."""
    from ..tokenizer.templates import plurality_template

    st = info.stage
    if not (st.chat_template or st.chat_template_auto):
        return
    if info.vocab is None:
        log.warning("stage '%s': chat_template is set but the models have no tokenizer; it is not written "
                    "(as in mergekit)", st.label)
        return
    text = st.chat_template
    if st.chat_template_auto:
        text = plurality_template([v.chat_template if (v := inputs.vocab(r)) is not None else None
                                   for r in st.inputs()])
        if text is None:
            log.info("stage '%s': chat_template auto: no input model has a template; keeping the tokenizer's",
                     st.label)
            return
        st.chat_template = text  # what the writer puts into tokenizer_config.json and the GGUF
    info.vocab = dataclasses.replace(info.vocab, chat_template=text)


def _check_della(st: Stage, info: StageInfo, recipe_path) -> list[GGMergeError]:
    """DELLA's ``0 < density - epsilon`` and ``density + epsilon < 1`` (when 0 < density < 1) for every
    model and tensor, from the parameters each tensor resolves to (gradients, filters, scopes), so the
    recipe fails before the pass and not at the first offending tensor. One problem per model."""
    from ..methods.sparsify import check_della

    m = st.method
    if m.sparsify != "della_magprune":
        return []
    problems: dict[str, GGMergeError] = {}
    for job in info.jobs.values():
        ops = job.operands[1:] if job.operands and job.operands[0].is_base else job.operands
        for op in ops:
            if op.ref in problems:
                continue
            p = resolve_all(m.model_params, (op.params, job.slice_params, st.params), job, op.tensor)
            try:
                check_della(float(p["density"]), float(p["epsilon"]))
            except GGMergeError as exc:
                line = next((mi.line for mi in st.all_models() if mi.ref == op.ref), st.line)
                problems[op.ref] = GGMergeError(f"stage '{st.label}', model '{op.ref}': {exc.message}",
                                                path=recipe_path, line=line or None, key=exc.key,
                                                tensor=op.tensor)
    return list(problems.values())


def plan_stage(st: Stage, inputs: Inputs) -> StageInfo:
    anchor = st.base or st.all_models()[0].ref
    config = dict(inputs.config(anchor))
    family = family_for(config, path=inputs.where(anchor))
    for ref in st.inputs():
        other = family_for(inputs.config(ref), path=inputs.where(ref))
        if other is not family:
            raise GGMergeError(f"stage '{st.label}' merges a {other.gguf_arch} model with a {family.gguf_arch} "
                               f"one ({inputs.where(anchor)}); models of one architecture only",
                               path=inputs.where(ref), key="architectures")

    vocab, row_maps = _plan_vocab(st, inputs, config)
    info = StageInfo(stage=st, config=config, vocab=vocab, row_maps=row_maps, family=family)
    if st.token_overrides:
        info.token_rows = _plan_token_rows(st, inputs, vocab, row_maps)
    out_rows = None
    if vocab is not None and row_maps is not None:
        out_rows = len(next(iter(row_maps.values())))
        if st.pad_to_multiple_of:  # padding rows get each model's mean row (remap_rows), like mergekit
            out_rows = -(-out_rows // st.pad_to_multiple_of) * st.pad_to_multiple_of

    if st.slices is None:
        _plan_models_form(st, inputs, info, anchor, out_rows)
    else:
        _plan_slices_form(st, inputs, info, out_rows)

    if out_rows is not None:
        config["vocab_size"] = out_rows
    if vocab is not None:
        for key, tid in (("bos_token_id", vocab.bos_id), ("eos_token_id", vocab.eos_id), ("pad_token_id", vocab.pad_id)):
            if tid is not None:
                config[key] = tid
    config["tie_word_embeddings"] = TIED_HEAD[0] not in info.jobs
    return info


def _operands_for(st: Stage, models: list[ModelInput], base: str | None, name_of) -> list[Operand]:
    """The inputs of one tensor job, in the order the stage's method expects them."""
    if st.method.base_is_model:
        # linear/passthrough: the base is one more ordinary input, appended if not listed (as mergekit does)
        ops = [Operand(m.ref, name_of(m), dict(m.params)) for m in models]
        if base is not None and all(m.ref != base for m in models):
            ops.append(Operand(base, name_of(None), {}))
        return ops
    ops: list[Operand] = []
    if base is not None:
        base_entry = next((m for m in models if m.ref == base), None)
        ops.append(Operand(base, name_of(base_entry), dict(base_entry.params) if base_entry else {}, is_base=True))
    for m in models:
        if base is not None and m.ref == base:
            continue
        ops.append(Operand(m.ref, name_of(m), dict(m.params)))
    return ops


def _check_required(st: Stage, job: TensorJob, recipe_path) -> None:
    """Every REQUIRED parameter is set for every model (model entry, slice or stage ``parameters``)."""
    from ..methods import REQUIRED

    m = st.method
    ops = job.operands[1:] if job.operands and job.operands[0].is_base else job.operands
    has_base = bool(job.operands) and job.operands[0].is_base
    try:
        m.check_counts(has_base, len(ops))
    except GGMergeError as exc:
        raise GGMergeError(f"stage '{st.label}': {exc.message}", path=recipe_path, key=exc.key) from None
    for key, default in m.params.items():
        if default is REQUIRED and key not in job.slice_params and key not in st.params:
            raise GGMergeError(f"stage '{st.label}' ({m.name}) needs parameter '{key}'", path=recipe_path,
                               key="parameters")
    for op in ops:
        for key, default in m.model_params.items():
            if default is REQUIRED and not any(key in c for c in (op.params, job.slice_params, st.params)):
                raise GGMergeError(f"stage '{st.label}' ({m.name}) needs parameter '{key}' for model "
                                   f"'{op.ref}'", path=recipe_path, key="parameters")


def _plan_models_form(st: Stage, inputs: Inputs, info: StageInfo, anchor: str, out_rows):
    n_layers = int(info.config.get("num_hidden_layers", 0))
    for name in inputs.names(anchor):
        if info.family.is_ignored(name):
            continue
        m = _LAYER.match(name)
        layer = int(m.group(2)) if m else None
        ops = _operands_for(st, st.models, st.base, lambda _m, n=name: n)
        job = TensorJob(name=name, shape=(), operands=ops, slice_params={}, layer=layer, span=n_layers,
                        vocab_rows=name in info.family.vocab_tensors)
        job.shape = _check_shapes(job, inputs, info, out_rows)
        info.jobs[name] = job
    for job in list(info.jobs.values())[:1]:
        _check_required(st, job, inputs.recipe.path)
    _check_extra_tensors(st, inputs, info)


def _plan_slices_form(st: Stage, inputs: Inputs, info: StageInfo, out_rows):
    first, last = st.slices[0], st.slices[-1]
    anchor = first.sources[0].ref
    layer_free = [n for n in inputs.names(anchor) if not _LAYER.match(n)]
    out_layer = 0
    pending_post = []
    for n in layer_free:
        post = n in info.family.post_tensors
        sl = last if post else first
        job = TensorJob(name=n, shape=(), operands=_operands_for(st, sl.sources, sl.base, lambda _m, n=n: n),
                        slice_params=dict(sl.params), layer=None, span=1,
                        vocab_rows=n in info.family.vocab_tensors)
        if post:
            pending_post.append(job)  # written after the layers, as in the model
        else:
            info.jobs[n] = job
    for sl in st.slices:
        start0, end0 = sl.sources[0].layer_range
        span = end0 - start0
        for k in range(span):
            # tensors of this layer, named after the first source's layer
            src_names = [n for n in inputs.names(sl.sources[0].ref)
                         if (m := _LAYER.match(n)) and int(m.group(2)) == start0 + k]
            if not src_names:
                raise GGMergeError(f"layer_range {list(sl.sources[0].layer_range)} goes past the model's "
                                   f"layers (no layer {start0 + k})", path=inputs.where(sl.sources[0].ref))
            for n in src_names:
                suffix = _LAYER.match(n).group(3)
                out_name = f"model.layers.{out_layer}{suffix}"

                def name_of(mi, suffix=suffix, k=k):
                    lr = mi.layer_range if mi is not None else sl.sources[0].layer_range
                    return f"model.layers.{lr[0] + k}{suffix}"

                job = TensorJob(name=out_name, shape=(), operands=_operands_for(st, sl.sources, sl.base, name_of),
                                slice_params=dict(sl.params), layer=k, span=span)
                info.jobs[out_name] = job
            out_layer += 1
    for job in pending_post:
        info.jobs[job.name] = job
    for job in info.jobs.values():
        job.shape = _check_shapes(job, inputs, info, out_rows)
        _check_required(st, job, inputs.recipe.path)
    info.config["num_hidden_layers"] = out_layer


def _check_shapes(job: TensorJob, inputs: Inputs, info: StageInfo, out_rows) -> tuple[int, ...]:
    shapes = []
    for op in job.operands:
        if not inputs.has(op.ref, op.tensor):
            raise GGMergeError(f"missing tensor (needed by stage '{info.stage.label}')",
                               path=inputs.where(op.ref), tensor=op.tensor)
        shapes.append(inputs.shape(op.ref, op.tensor))
    if job.vocab_rows and info.row_maps is not None:
        cols = {s[1:] for s in shapes}
        if len(cols) != 1:
            raise _shape_error(job, inputs, shapes, info)
        return (out_rows, *shapes[0][1:])
    if len(set(shapes)) != 1:
        if job.vocab_rows:
            detail = ", ".join(f"{inputs.where(op.ref)}: {s[0]}" for op, s in zip(job.operands, shapes))
            raise GGMergeError(
                f"vocabulary sizes differ ({detail}) in stage '{info.stage.label}'; set "
                f"'tokenizer_source: union' (or 'base', or a model) to merge them", tensor=job.name,
                path=inputs.recipe.path)
        raise _shape_error(job, inputs, shapes, info)
    return shapes[0]


def _shape_error(job, inputs, shapes, info):
    detail = ", ".join(f"{inputs.where(op.ref)} has {list(s)}" for op, s in zip(job.operands, shapes))
    return GGMergeError(f"shape mismatch in stage '{info.stage.label}': {detail}", tensor=job.name,
                        path=inputs.where(job.operands[-1].ref))


def _check_extra_tensors(st: Stage, inputs: Inputs, info: StageInfo) -> None:
    expected = set(info.jobs)
    for ref in st.inputs():
        extra = [n for n in inputs.names(ref) if n not in expected
                 and not info.family.is_ignored(n)]
        if extra:
            log.warning("%s: %d tensor(s) not in the base model are ignored (e.g. %s)",
                        inputs.where(ref), len(extra), extra[0])


def _plan_vocab(st: Stage, inputs: Inputs, config: dict):
    """The stage's output vocabulary and, when rows must be remapped, a map per input."""
    from ..tokenizer import union as union_mod

    refs = st.inputs()
    anchor = st.base or refs[0]
    src = st.tokenizer_source
    if src is None:
        return inputs.vocab(anchor), None
    vocabs = []
    for r in refs:
        v = inputs.vocab(r)
        if v is None:
            raise GGMergeError(f"tokenizer_source '{src}' needs a tokenizer, but this model has none",
                               path=inputs.where(r))
        vocabs.append(v)
    # tokens past an input's embedding rows have no row: drop them, as mergekit does
    embed = TIED_HEAD[1]
    n_rows = [inputs.shape(r, embed)[0] if embed in inputs.names(r) else None for r in refs]
    if src == "union":
        merged, maps = union_mod.union_vocab(vocabs, base=refs.index(anchor), n_rows=n_rows)
    else:
        donor = anchor if src == "base" else src
        if donor not in refs:
            if inputs.recipe.stage(donor) is None and donor not in inputs.sources:
                raise GGMergeError(f"tokenizer_source '{donor}' is not one of this stage's models",
                                   path=inputs.recipe.path, key="tokenizer_source")
        dv = inputs.vocab(donor)
        merged, maps = union_mod.vocab_from_donor(dv, vocabs, n_rows=n_rows)
    return merged, dict(zip(refs, maps))


def _plan_token_rows(st: Stage, inputs: Inputs, vocab: Vocab, row_maps: dict) -> dict:
    """``tokenizer.tokens`` as rows: mirrors mergekit ``PermutedVocabulary``: an override matters for a
    token some model lacks, or for every model with ``force``; its row is the source model's own row of
    the token, row ``token_id`` (or of ``token`` in its own vocabulary) of the source model, or zeros."""
    index = {t: i for i, t in enumerate(vocab.tokens)}
    out: dict[int, tuple[bool, str | None, int | None]] = {}
    where = dict(path=inputs.recipe.path, key="tokens")
    for tok, ov in st.token_overrides.items():
        j = index.get(tok)
        if j is None:
            raise GGMergeError(f"tokenizer.tokens: '{tok}' is not in the merged vocabulary; adding new tokens "
                               "this way is a mergekit feature ggmerge does not support yet", **where)
        if not ov.force and all(m[j] >= 0 for m in row_maps.values()):
            continue  # every model has it: each keeps its own row, as in mergekit
        if ov.kind is None:
            raise GGMergeError(f"tokenizer.tokens: '{tok}' needs a 'source' (some model lacks it, or it is "
                               "forced)", **where)
        if ov.kind == "zero":
            out[j] = (ov.force, None, None)
            continue
        if ov.ref not in row_maps:
            raise GGMergeError(f"tokenizer.tokens: the source of '{tok}', '{ov.ref}', is not one of this "
                               "stage's models", **where)
        if ov.kind == "model":
            row = int(row_maps[ov.ref][j])
            if row < 0:
                raise GGMergeError(f"tokenizer.tokens: '{tok}' is not in the vocabulary of its source "
                                   f"'{ov.ref}'", **where)
        else:
            row = ov.token_id
            if row is None:
                own = inputs.vocab(ov.ref)
                if own is None or ov.token not in own.tokens:
                    raise GGMergeError(f"tokenizer.tokens: source token '{ov.token}' is not in the vocabulary "
                                       f"of '{ov.ref}'", **where)
                row = own.tokens.index(ov.token)
            n = inputs.shape(ov.ref, "model.embed_tokens.weight")[0]
            if row >= n:
                raise GGMergeError(f"tokenizer.tokens: token_id {row} for '{tok}' is past the {n} rows of "
                                   f"'{ov.ref}'", **where)
        out[j] = (ov.force, ov.ref, row)
    return out

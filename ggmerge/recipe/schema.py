"""Recipe files: mergekit's YAML (single or multi-document), validated once into typed stages.

A recipe is one or more YAML documents. Each document is a mergekit ``MergeConfiguration`` (``models`` or
``slices``, ``merge_method``, ``base_model``, ``parameters``, ``dtype``, ``tokenizer_source`` /
``tokenizer``, ``chat_template``). As in ``mergekit-multi``, a document with ``name:`` is an intermediate
stage that later documents refer to by that name (``./name`` also works, which is how the seed's model
card spells them); the document without ``name:`` (or else the last one) is the output.

ggmerge's own settings live under an optional ``ggmerge:`` mapping in the output document; mergekit
ignores unknown keys, so the file stays a valid mergekit-multi recipe.

Leniency, as mergekit's pydantic models have it: keys a mergekit recipe may carry but mergekit ignores
(unknown keys in a document, a model entry, a slice or ``tokenizer:``, e.g. a typo such as ``dype:``
or ``revision:`` beside ``model:``) and parameters the merge method does not use (``weight`` on
model_stock) are ignored with a WARNING naming the file, line and key; ``strict=True``
(``ggmerge build --strict``) makes each an error. Value problems (ranges, types) are collected and
reported together, one line each.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dtypes import parse_dtype
from ..errors import GGMergeError, did_you_mean, raise_all
from ..methods import METHODS, Method
from .yamlload import Node, Seq, load_documents

log = logging.getLogger(__name__)

DOC_KEYS = {
    "name", "merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "modules", "ggmerge",
}
MODEL_KEYS = {"model", "parameters", "layer_range"}
SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
GGMERGE_KEYS = {"name", "seed", "shard_size", "miniature", "gguf"}
#: merge methods mergekit 0.1.5 has and ggmerge does not (yet): refused with a message saying so
MERGEKIT_ONLY_METHODS = {"multislerp", "nearswap", "ram", "ramplus_tl"}

#: parameters with a known valid range: name → (low, high, low_inclusive)
RANGES = {
    "density": (0.0, 1.0, False),
    "t": (0.0, 1.0, True),
    "gamma": (0.0, 1.0, True),
    "epsilon": (0.0, 1.0, True),
}


@dataclass(frozen=True)
class TokenOverride:
    """One entry of mergekit's ``tokenizer.tokens`` (``mergekit.tokenizer.config.TokenEmbeddingConfig``):
    where the token's embedding row comes from for the models that lack it (every model, with
    ``force``). ``kind``: "model" (that model's own row of this token), "model_token" (row ``token_id``
    of ``ref``, or the row of ``token`` in ``ref``'s own vocabulary), "zero", or None (no source: only
    valid while every model has the token and nothing is forced, as in mergekit)."""
    kind: str | None
    ref: str | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass
class ModelInput:
    ref: str
    params: dict = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None
    line: int = 0


@dataclass
class Slice:
    sources: list[ModelInput]
    base: str | None = None
    params: dict = field(default_factory=dict)


@dataclass
class Stage:
    name: str                      # "" for the output stage
    method: Method
    base: str | None
    models: list[ModelInput]       # the `models:` form (empty when `slices:` is used)
    slices: list[Slice] | None
    params: dict
    #: None when the recipe gives no ``dtype:``: the planner then takes the inputs' stored dtype, as
    #: mergekit keeps it (``ggmerge.recipe.plan._input_dtype``)
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    tokenizer_source: str | None   # "union" | "base" | a model/stage reference | None
    pad_to_multiple_of: int | None
    #: the template TEXT to write (a name, file or literal resolved when the recipe is loaded, so a dry
    #: run finds a bad one); None when not given, and for ``auto`` until the planner resolves it
    chat_template: str | None
    line: int
    #: ``chat_template: auto``: the plurality template of this stage's inputs (resolved at plan time)
    chat_template_auto: bool = False
    #: ``tokenizer.tokens``: token string → its embedding-row override (mergekit TokenEmbeddingConfig)
    token_overrides: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or "output"

    def inputs(self) -> list[str]:
        """Every model/stage reference this stage reads, base first, without duplicates."""
        refs: list[str] = []
        for r in ([self.base] if self.base else []) + [m.ref for m in self.all_models()]:
            if r not in refs:
                refs.append(r)
        return refs

    def all_models(self) -> list[ModelInput]:
        if self.slices is None:
            return list(self.models)
        return [s for sl in self.slices for s in sl.sources]


@dataclass
class Recipe:
    path: Path
    text: str
    stages: list[Stage]            # dependency order; the output stage is last
    name: str
    seed: int
    shard_size: int
    #: folder (relative to the recipe) where the bundled miniature lineage is created on first use
    miniature: str | None = None
    #: llama.cpp file types every build also writes as GGUF files (``ggmerge.gguf``)
    gguf: list = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def output(self) -> Stage:
        return self.stages[-1]

    def stage(self, ref: str) -> Stage | None:
        return _stage_lookup({s.name: s for s in self.stages if s.name}, ref)

    def leaf_refs(self) -> list[str]:
        """Model references that are not stages (what must be opened as sources), in first-use order."""
        out: list[str] = []
        for st in self.stages:
            for r in st.inputs():
                if self.stage(r) is None and r not in out:
                    out.append(r)
        return out


def _stage_lookup(by_name: dict, ref: str):
    if ref in by_name:
        return by_name[ref]
    stripped = ref[2:] if ref.startswith("./") else ref
    return by_name.get(stripped)


class _Ctx:
    """Carries the recipe path for error messages, the ``strict`` setting, and the problems collected
    so far (reported together by :meth:`done` or with the next fatal error by :meth:`fail`)."""

    def __init__(self, path: Path, strict: bool = False):
        self.path = path
        self.strict = strict
        self.problems: list[GGMergeError] = []
        self.ignored: list[str] = []   # what lenient() let through, for a later fatal error to mention

    def lenient(self, msg: str, node, key: str, hint: str = "") -> None:
        """Something mergekit accepts and ignores: a WARNING (an error with ``strict``)."""
        exc = self.err(msg, node, key)
        if self.strict:
            self.problems.append(exc)
        else:
            log.warning("%s; ignored, as mergekit does (--strict makes this an error)", exc)
            if hint:  # a likely typo, worth naming again if the recipe then fails
                self.ignored.append(f"'{key}'" + (f" at line {exc.line}" if exc.line else "") + hint)

    def collect(self, exc: GGMergeError) -> None:
        self.problems.append(exc)

    def fail(self, exc: GGMergeError):
        """Raise the problems collected so far, then ``exc`` (often their consequence) last."""
        raise_all(self._in_file_order() + [exc], log)

    def done(self) -> None:
        raise_all(self._in_file_order(), log)

    def _in_file_order(self) -> list[GGMergeError]:
        # parsing visits a document's 'parameters' before its models; users read top to bottom
        return sorted(self.problems, key=lambda e: e.line or 0)

    def err(self, msg: str, node=None, key: str | None = None) -> GGMergeError:
        line = None
        if isinstance(node, Node) and key is not None:
            line = node.line_of(key)
        elif isinstance(node, (Node, Seq)):
            line = node.line
        return GGMergeError(msg, path=self.path, key=key, line=line)


def load_recipe(path: str | Path, *, strict: bool = False) -> Recipe:
    """Read and validate a recipe file. ``strict``: keys and parameters mergekit ignores are errors
    instead of warnings."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GGMergeError("recipe file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GGMergeError(f"cannot read recipe: {exc}", path=path) from None
    return parse_recipe(text, path, strict=strict)


def parse_recipe(text: str, path: str | Path = "<recipe>", *, strict: bool = False) -> Recipe:
    path = Path(path)
    ctx = _Ctx(path, strict)
    try:
        recipe = _parse_recipe(text, path, ctx)
    except GGMergeError as exc:
        if ctx.problems:
            ctx.fail(exc)
        if ctx.ignored:
            # the ignored key is often the cause (a typo of a key this error asks for): say so on this line
            raise GGMergeError(f"{exc.message} (ignored: {', '.join(ctx.ignored)})", path=exc.path,
                               tensor=exc.tensor, key=exc.key, line=exc.line) from None
        raise
    ctx.done()
    return recipe


def _warn_duplicates(node, ctx: _Ctx) -> None:
    """Keys given twice in one mapping: mergekit's YAML loader keeps the last value; so do we, loudly."""
    if isinstance(node, Node):
        for key, line in node.duplicates:
            ctx.lenient(f"key '{key}' is given again at line {line}; the last value is used", node, key)
        for v in node.values():
            _warn_duplicates(v, ctx)
    elif isinstance(node, list):
        for v in node:
            _warn_duplicates(v, ctx)


def _parse_recipe(text: str, path: Path, ctx: _Ctx) -> Recipe:
    docs = load_documents(text, path)
    for doc in docs:
        _warn_duplicates(doc, ctx)
    by_name: dict[str, Stage] = {}
    order: list[Stage] = []
    output_doc = None
    unnamed = [d for d in docs if "name" not in d]
    if len(unnamed) > 1:
        raise ctx.err("more than one document has no 'name:'; only the output stage may be unnamed", unnamed[1])
    for doc in docs:
        is_output = ("name" not in doc) if unnamed else (doc is docs[-1])
        stage = _parse_stage(doc, ctx, is_output)
        if stage.name in by_name:
            raise ctx.err(f"duplicate stage name '{stage.name}'", doc, "name")
        if stage.name:
            by_name[stage.name] = stage
        order.append(stage)
        if is_output:
            output_doc = doc
    output = next(s for s, d in zip(order, docs) if d is output_doc)
    if output.name:  # every document was named: the last one is the output
        by_name.pop(output.name, None)
        by_name[output.name] = output
    stages = _toposort(order, by_name, output, ctx)

    gg = output_doc.get("ggmerge") or Node()
    if not isinstance(gg, dict):
        raise ctx.err("'ggmerge' must be a mapping", output_doc, "ggmerge")
    _check_keys(gg, GGMERGE_KEYS, ctx, "ggmerge", lenient=False)  # ggmerge's own block: a typo is ours
    name = str(gg.get("name") or (output.name or _default_name(path)))
    seed = gg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ctx.err(f"seed must be an integer, got {seed!r}", gg, "seed")
    shard = gg.get("shard_size", "5GB")
    mini = gg.get("miniature")
    if mini is not None and not isinstance(mini, str):
        raise ctx.err("'miniature' must be a folder name", gg, "miniature")
    gguf = gg.get("gguf") or []
    if isinstance(gguf, str):
        gguf = [t for t in gguf.split(",")]
    if not isinstance(gguf, list):
        raise ctx.err("'gguf' must be a list of llama.cpp file types, e.g. [q4_k_m, q6_k]", gg, "gguf")
    try:
        from ..gguf_outputs import parse_types

        types = parse_types([str(t) for t in gguf])
    except GGMergeError as exc:
        raise ctx.err(exc.message, gg, "gguf") from None
    return Recipe(path=path, text=text, stages=stages, name=name, seed=seed,
                  shard_size=parse_size(shard, ctx, gg), miniature=mini,
                  gguf=types)


def _default_name(path: Path) -> str:
    parent = path.resolve().parent.name
    return parent or path.stem


def parse_size(value, ctx: _Ctx, node) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    s = str(value).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                n = float(s[: -len(unit)])
            except ValueError:
                break
            if n > 0:
                return int(n * mult)
    raise ctx.err(f"shard_size must look like '5GB' or '500MB', got {value!r}", node, "shard_size")


def _check_keys(node: dict, allowed: set, ctx: _Ctx, where: str, *, lenient: bool = True) -> None:
    """Unknown keys: ignored with a warning where mergekit ignores them (its pydantic models drop extra
    keys), else errors."""
    for k in node:
        if k in allowed:
            continue
        hint = did_you_mean(k, allowed)
        if k == "revision" and "model" in allowed:
            # mergekit reads a revision only from the reference itself (ModelPath 'name@rev')
            hint = " (to pin a revision, write it into the reference: 'model: org/name@REVISION')"
        msg = f"unknown key '{k}' in {where}{hint}"
        if lenient:
            ctx.lenient(msg, node, k, hint if hint.startswith(" (did you mean") else "")
        else:
            raise ctx.err(msg, node, k)


def _ref(value, ctx: _Ctx, node, key) -> str:
    """A model reference as one string: a path, Hub id (``org/name@rev``), stage name, or mergekit's
    ``MODEL+LORA`` (also in its expanded form ``{model: {path, revision}, lora: {path, revision}}``)."""
    def flat(v):
        if isinstance(v, dict) and "path" in v:
            rev = v.get("revision")
            return f"{v['path']}@{rev}" if rev else v["path"]
        return v

    lora = None
    if isinstance(value, dict) and "model" in value and isinstance(value["model"], (str, dict)):
        lora = flat(value.get("lora"))  # mergekit's expanded ModelReference
        value = value["model"]
    value = flat(value)
    if isinstance(value, str) and isinstance(lora, str) and lora.strip():
        value = f"{value}+{lora}"
    if not isinstance(value, str) or not value.strip():
        raise ctx.err(f"expected a model path or Hub id, got {value!r}", node, key)
    if value.count("+") > 1 and not Path(value).exists():
        raise ctx.err(f"'{value}': a LoRA reference is 'MODEL+ADAPTER' (one '+')", node, key)
    return value.strip()


def _single_module(doc: Node, ctx: _Ctx) -> Node:
    """mergekit's ``modules:`` form for a one-module architecture, as the equivalent plain document.

    mergekit describes every Llama-family architecture (Llama, Mistral, Qwen2, …) as ONE module named
    ``default``; its planner turns ``models:``/``slices:`` into ``modules: {default: …}`` itself
    (``MergePlanner.normalize_config``), so ``modules: {default: {models|slices, parameters}}`` is the
    same merge with the module's ``parameters`` between the slice's and the document's in precedence
    (``ConfigReader.parameter_sources``) — i.e. they override the document's, key by key. Other module
    names belong to multimodal architectures (a vision tower beside the text model), which ggmerge does
    not merge; mergekit itself fails on them for a Llama-family model."""
    mods = doc["modules"]
    if "models" in doc or "slices" in doc:
        raise ctx.err("exactly one of 'models', 'slices' or 'modules' must be given", doc, "modules")
    if not isinstance(mods, dict) or not mods:
        raise ctx.err("'modules' must be a mapping of module name → {models | slices, parameters}", doc, "modules")
    names = list(mods)
    if names != ["default"]:
        raise ctx.err(f"'modules' names {', '.join(map(str, names))}: the architectures ggmerge merges (and "
                      "mergekit's Llama-family definitions) have one module, 'default'; multi-module merges "
                      "(multimodal models) are not supported", doc, "modules")
    mod = mods["default"]
    if not isinstance(mod, dict):
        raise ctx.err("module 'default' must be a mapping", mods, "default")
    _check_keys(mod, {"models", "slices", "parameters"}, ctx, "module 'default'")
    flat = Node({k: v for k, v in doc.items() if k != "modules"})
    flat.line, flat.key_lines = doc.line, dict(doc.key_lines)
    for key in ("models", "slices"):
        if key in mod:
            flat[key] = mod[key]
            flat.key_lines[key] = mod.line_of(key) if isinstance(mod, Node) else doc.line
    if mod.get("parameters"):
        merged = Node({**(doc.get("parameters") or {}), **mod["parameters"]})
        src = mod["parameters"]
        merged.line = getattr(src, "line", doc.line)
        merged.key_lines = {**getattr(doc.get("parameters"), "key_lines", {}), **getattr(src, "key_lines", {})}
        flat["parameters"] = merged
    return flat


def _token_overrides(tokens, ctx: _Ctx, node) -> dict:
    """``tokenizer.tokens`` as mergekit's pydantic models read it: token → {source, force}; a source is
    a model reference, ``{kind: zero}`` or ``{kind: model_token, model, token_id | token}``."""
    if not isinstance(tokens, dict):
        raise ctx.err("'tokens' must be a mapping of token → {source, force}", node, "tokens")
    out = {}
    for tok, cfg in tokens.items():
        cfg = {} if cfg is None else cfg
        if not isinstance(tok, str) or not isinstance(cfg, dict):
            raise ctx.err(f"token '{tok}': expected {{source: ..., force: ...}}", tokens, tok)
        _check_keys(cfg, {"source", "force"}, ctx, f"token '{tok}'")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise ctx.err(f"token '{tok}': 'force' must be true or false, got {force!r}", cfg, "force")
        src = cfg.get("source")
        if src is None:
            out[tok] = TokenOverride(None, force=force)
        elif isinstance(src, dict) and "kind" in src:
            kind = src["kind"]
            if kind == "zero":
                out[tok] = TokenOverride("zero", force=force)
            elif kind == "model_token":
                if "model" not in src:
                    raise ctx.err(f"token '{tok}': a model_token source needs 'model'", src, "kind")
                tid, ttok = src.get("token_id"), src.get("token")
                if (tid is None) == (ttok is None):
                    raise ctx.err(f"token '{tok}': give exactly one of token_id or token", src, "kind")
                if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
                    raise ctx.err(f"token '{tok}': token_id must be a non-negative integer", src, "token_id")
                out[tok] = TokenOverride("model_token", _ref(src["model"], ctx, src, "model"), tid,
                                         None if ttok is None else str(ttok), force)
            else:
                raise ctx.err(f"token '{tok}': unknown source kind {kind!r} (model_token or zero)", src, "kind")
        else:
            out[tok] = TokenOverride("model", _ref(src, ctx, cfg, "source"), force=force)
    return out


def _parse_stage(doc: Node, ctx: _Ctx, is_output: bool) -> Stage:
    _check_keys(doc, DOC_KEYS, ctx, "the recipe")
    if "modules" in doc:
        doc = _single_module(doc, ctx)
    if "ggmerge" in doc and not is_output:
        raise ctx.err("the 'ggmerge' block belongs in the output document", doc, "ggmerge")
    name = doc.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ctx.err("'name' must be a non-empty string", doc, "name")
    if "merge_method" not in doc:
        raise ctx.err("missing 'merge_method'", doc)
    mname = doc["merge_method"]
    if mname not in METHODS:
        supported = ", ".join(METHODS)
        if isinstance(mname, str) and mname in MERGEKIT_ONLY_METHODS:
            raise ctx.err(f"merge_method '{mname}' is a mergekit method ggmerge does not support yet "
                          f"(ggmerge supports: {supported})", doc, "merge_method")
        raise ctx.err(f"unknown merge_method '{mname}'{did_you_mean(mname, METHODS)} (ggmerge supports: "
                      f"{supported})", doc, "merge_method")
    method = METHODS[mname]
    has_models, has_slices = "models" in doc, "slices" in doc
    if has_models == has_slices:
        raise ctx.err("exactly one of 'models' or 'slices' must be given", doc)
    base = _ref(doc["base_model"], ctx, doc, "base_model") if doc.get("base_model") is not None else None
    allowed_params = set(method.params) | set(method.model_params)
    params = _parse_params(doc.get("parameters"), allowed_params, ctx, doc, "parameters", mname)

    models: list[ModelInput] = []
    slices = None
    if has_models:
        if not isinstance(doc["models"], list) or not doc["models"]:
            raise ctx.err("'models' must be a non-empty list", doc, "models")
        for item in doc["models"]:
            models.append(_parse_model(item, ctx, doc, allowed_params, mname, slices=False))
    else:
        if not isinstance(doc["slices"], list) or not doc["slices"]:
            raise ctx.err("'slices' must be a non-empty list", doc, "slices")
        slices = []
        for sl in doc["slices"]:
            if not isinstance(sl, dict) or "sources" not in sl:
                raise ctx.err("each slice needs 'sources'", sl if isinstance(sl, Node) else doc, "slices")
            _check_keys(sl, SLICE_KEYS, ctx, "a slice")
            srcs = [_parse_model(s, ctx, sl, allowed_params, mname, slices=True) for s in sl["sources"]]
            lens = {s.layer_range[1] - s.layer_range[0] for s in srcs}
            if len(lens) != 1:
                raise ctx.err("all sources of a slice must span the same number of layers", sl, "sources")
            sbase = _ref(sl["base_model"], ctx, sl, "base_model") if sl.get("base_model") else base
            slices.append(Slice(srcs, sbase, _parse_params(sl.get("parameters"), allowed_params, ctx, sl,
                                                          "parameters", mname)))

    tok_src = None
    pad = None
    overrides: dict = {}
    if "tokenizer_source" in doc and "tokenizer" in doc:
        raise ctx.err("give either 'tokenizer_source' or 'tokenizer', not both", doc, "tokenizer")
    if doc.get("tokenizer_source") is not None:
        tok_src = _ref(doc["tokenizer_source"], ctx, doc, "tokenizer_source")
    if doc.get("tokenizer") is not None:
        tk = doc["tokenizer"]
        if not isinstance(tk, dict):
            raise ctx.err("'tokenizer' must be a mapping", doc, "tokenizer")
        _check_keys(tk, TOKENIZER_KEYS, ctx, "tokenizer")
        if tk.get("tokens") is not None:
            overrides = _token_overrides(tk["tokens"], ctx, tk)
        tok_src = _ref(tk.get("source", "union"), ctx, tk, "source")
        pad = tk.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise ctx.err(f"pad_to_multiple_of must be a positive integer, got {pad!r}", tk, "pad_to_multiple_of")

    dtype = _dtype(doc, "dtype", ctx)
    out_dtype = _dtype(doc, "out_dtype", ctx)
    chat, auto = _chat_template(doc, ctx)

    stage = Stage(name=(name or "").strip(), method=method, base=base, models=models, slices=slices,
                  params=params, dtype=dtype, out_dtype=out_dtype, tokenizer_source=tok_src,
                  pad_to_multiple_of=pad, chat_template=chat, line=doc.line, chat_template_auto=auto,
                  token_overrides=overrides)
    _check_method_inputs(stage, ctx, doc)
    return stage


def _dtype(doc: Node, key: str, ctx: _Ctx) -> torch.dtype | None:
    """``dtype``/``out_dtype``, or None when absent (mergekit then keeps the inputs' dtype)."""
    if doc.get(key) is None:
        return None
    try:
        return parse_dtype(doc[key])
    except GGMergeError as exc:
        raise ctx.err(exc.message, doc, key) from None


def _chat_template(doc: Node, ctx: _Ctx) -> tuple[str | None, bool]:
    """The template text (resolved now, so ``--dry-run`` finds a bad one) and whether it is ``auto``."""
    from ..tokenizer.templates import AUTO, resolve_recipe_template

    chat = doc.get("chat_template")
    if chat is None:
        return None, False
    if not isinstance(chat, str) or not chat.strip():
        raise ctx.err("'chat_template' must be a name ('chatml', 'vicuna', 'auto', ...), a file path or a "
                      "Jinja string", doc, "chat_template")
    if chat.strip().lower() == AUTO:
        return None, True
    try:
        return resolve_recipe_template(chat, ctx.path.parent), False
    except GGMergeError as exc:
        if exc.path is not None:  # a problem inside the named template file: that file is the place
            raise
        raise ctx.err(exc.message, doc, "chat_template") from None


def _parse_model(item, ctx: _Ctx, parent, allowed, mname, *, slices: bool) -> ModelInput:
    if isinstance(item, str):
        if slices:
            raise ctx.err("slice sources need 'model' and 'layer_range'", parent, "sources")
        return ModelInput(ref=_ref(item, ctx, parent, "models"), line=getattr(parent, "line", 0))
    if not isinstance(item, dict) or "model" not in item:
        raise ctx.err("each entry needs a 'model' key", item if isinstance(item, Node) else parent,
                      "model" if isinstance(item, Node) else None)
    _check_keys(item, MODEL_KEYS, ctx, "a model entry")
    lr = None
    if slices or "layer_range" in item:
        r = item.get("layer_range")
        if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or r[0] < 0 or r[1] <= r[0]):
            raise ctx.err(f"layer_range must be [start, end) with 0 <= start < end, got {r!r}", item, "layer_range")
        lr = (r[0], r[1])
    return ModelInput(ref=_ref(item["model"], ctx, item, "model"),
                      params=_parse_params(item.get("parameters"), allowed, ctx, item, "parameters", mname),
                      layer_range=lr, line=item.line)


def _parse_params(node, allowed: set, ctx: _Ctx, parent, key, mname) -> dict:
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise ctx.err("'parameters' must be a mapping", parent, key)
    from ..methods import PARAM_KINDS

    out = {}
    known = ', '.join(sorted(allowed)) or 'none'
    for k, v in node.items():
        if k not in allowed:
            # mergekit resolves only the parameters its method declares; the rest are never read
            if k in PARAM_KINDS:
                ctx.lenient(f"merge_method '{mname}' does not use parameter '{k}' (it takes: {known})", node, k)
            else:
                hint = did_you_mean(k, allowed)
                ctx.lenient(f"unknown parameter '{k}' for merge_method '{mname}'{hint} (known: {known})",
                            node, k, hint)
            continue
        try:
            _check_value(k, v, ctx, node)
        except GGMergeError as exc:
            ctx.collect(exc)  # a value problem: report it with the others, carry on checking
        out[k] = v
    return out


def _scalars(v):
    """Every scalar inside a parameter setting (scalar, gradient list, or filter entries)."""
    if isinstance(v, dict):
        yield from _scalars(v.get("value"))
    elif isinstance(v, list):
        for e in v:
            yield from _scalars(e)
    else:
        yield v


def _check_value(k: str, v, ctx: _Ctx, node) -> None:
    from ..methods import PARAM_KINDS
    from .params import validate

    try:
        ignored = validate(v, key=k, kind=PARAM_KINDS.get(k))
    except GGMergeError as exc:
        raise ctx.err(exc.message, node, k) from None  # the message already names the parameter
    for what in ignored:  # e.g. the old `pattern:` key: mergekit drops it, so the entry has no filter
        ctx.lenient(f"parameter '{k}': {what}", node, k)
    if isinstance(v, list) and not v:
        raise ctx.err(f"parameter '{k}' is an empty list", node, k)
    if isinstance(v, list):
        for e in v:
            if isinstance(e, dict) and "value" not in e:
                raise ctx.err(f"parameter '{k}': filter entries need 'value'", node, k)
    for s in _scalars(v):
        if isinstance(s, str) and k in RANGES:
            try:
                s = float(s)  # YAML reads 1e-3 as text; mergekit's typed parameters accept it
            except ValueError:
                raise ctx.err(f"parameter '{k}' must be a number, got {s!r}", node, k) from None
        if s is None:
            raise ctx.err(f"parameter '{k}' has no value", node, k)
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            if not math.isfinite(float(s)):
                raise ctx.err(f"parameter '{k}' must be finite, got {s!r}", node, k)
            if k in RANGES:
                lo, hi, lo_inc = RANGES[k]
                ok = (s >= lo if lo_inc else s > lo) and s <= hi
                if not ok:
                    lb = "[" if lo_inc else "("
                    raise ctx.err(f"parameter '{k}' = {s} is out of range {lb}{lo}, {hi}]", node, k)


def _check_method_inputs(stage: Stage, ctx: _Ctx, doc: Node) -> None:
    m = stage.method
    if m.requires_base and stage.base is None and not (stage.slices and all(s.base for s in stage.slices)):
        raise ctx.err(f"merge_method '{m.name}' needs a 'base_model'", doc, "merge_method")
    if stage.slices is not None:
        return  # counted per slice at plan time
    refs = [x.ref for x in stage.models]
    if m.base_is_model:  # linear/passthrough: the base is one more input
        n = len(refs) + (1 if stage.base is not None and stage.base not in refs else 0)
        has_base = False
    else:
        n = len([r for r in refs if r != stage.base])
        has_base = stage.base is not None
    try:
        m.check_counts(has_base, n)
    except GGMergeError as exc:
        raise ctx.err(exc.message, doc, "models") from None


def _toposort(order: list[Stage], by_name: dict, output: Stage, ctx: _Ctx) -> list[Stage]:
    """Stages reachable from the output, dependencies first; cycles are errors."""
    done: list[Stage] = []
    state: dict[int, str] = {}

    def visit(st: Stage, chain: list[str]):
        if state.get(id(st)) == "done":
            return
        if state.get(id(st)) == "active":
            cyc = " -> ".join(chain + [st.label])
            raise GGMergeError(f"stage cycle: {cyc}", path=ctx.path, line=st.line)
        state[id(st)] = "active"
        for ref in st.inputs() + ([st.tokenizer_source] if st.tokenizer_source not in (None, "union", "base") else []):
            dep = _stage_lookup(by_name, ref)
            if dep is None and ref.startswith("./") and not (ctx.path.parent / ref).exists():
                # './chatvec-1' for a stage named 'chatvec1': neither a stage nor a folder
                hint = did_you_mean(ref[2:], by_name)
                if hint:
                    raise GGMergeError(f"'{ref}' is neither a stage nor a folder{hint}", path=ctx.path,
                                       line=st.line, key=ref)
            if dep is not None:
                visit(dep, chain + [st.label])
        state[id(st)] = "done"
        done.append(st)

    visit(output, [])
    unused = [s.label for s in order if id(s) not in state]
    if unused:
        import logging
        logging.getLogger(__name__).warning("stages not used by the output: %s", ", ".join(unused))
    return done

"""A memory-bounded forward pass: one decoder layer in memory at a time, every calibration chunk through it.

``verify`` (the reference's logits over a text) and ``imatrix`` (what every matmul sees) both need the
model's activations over many tokens. Loading the model whole in float32 needs 4 bytes per parameter
(28 GB at 7B); here the peak is one decoder layer's weights in float32 plus the hidden states of the
chunks in flight:

1. transformers builds the model's skeleton from its config with every *parameter* on the meta device
   (no memory) while buffers (rotary frequencies, embedding scales) are computed for real on the CPU;
2. the model's own ``forward`` runs once with every decoder layer replaced by a recorder: that yields the
   keyword arguments each layer is called with (causal / sliding-window masks, rotary cos/sin, …) and,
   for each chunk, the input of layer 0 (embeddings, scaled as the architecture does). So no architecture
   is hard-coded here: whatever the model's forward computes between the embedding and the first layer,
   it computes;
3. each decoder layer in turn is materialised from the source (safetensors, or a GGUF dequantized and
   un-permuted to HF names), runs every chunk of the group, and is dropped;
4. the head runs through the CausalLM's own ``forward`` again (final norm, ``lm_head``, Gemma-2's logit
   soft-capping, …), with a stub embedding and layer 0 replaced by an injector returning the final hidden
   states of one chunk, so logits exist for one chunk's scored rows at a time.

Chunks are grouped so that their hidden states fit ``max_activation_bytes``; each group re-reads the
layers (one pass over the weights per group).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import GGMergeError
from .sources.base import TensorSource

log = logging.getLogger(__name__)

#: default bound on the hidden states kept between layers (float32 chunk × ctx × hidden)
DEFAULT_ACTIVATION_BYTES = 1 << 30


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Parameters created inside are put on the meta device; buffers stay real.

    The same idea as accelerate's ``init_empty_weights(include_buffers=False)``: the rotary inverse
    frequencies (non-persistent buffers, never in a checkpoint) must be computed for real by the module's
    ``__init__``, while the weights must cost nothing until a layer is loaded.
    """
    orig = nn.Module.register_parameter

    def register(self, name, param):
        orig(self, name, param)
        if param is not None:
            p = self._parameters[name]
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def _fix_malloc_threshold() -> None:
    """Keep glibc from raising its mmap threshold as layers are freed.

    glibc serves blocks above ``M_MMAP_THRESHOLD`` with their own mappings (returned to the system on
    free) but raises the threshold to the size of each freed mapped block, up to 32 MiB: after the first
    layer is dropped, the next layer's smaller tensors land in the heap, which fragments, and the peak grew
    by ~95 MB per layer on a 7B-wide model (BENCHMARKS.md). A fixed 1 MiB threshold turns that off.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class _Stop(Exception):
    """Raised by a recorder to end the model's forward early (nothing after it is needed)."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``i``: records its call's keyword arguments (and input hidden states),
    passes the hidden states through unchanged."""

    def __init__(self, i: int, tape: dict, stop_at: Callable[[int], bool]):
        super().__init__()
        self.i, self.tape, self.stop_at = i, tape, stop_at

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise GGMergeError("decoder layer called with positional arguments beyond hidden_states; "
                               "this architecture is not supported by the layer-wise forward pass")
        self.tape.setdefault("kwargs", {})[self.i] = kwargs
        if self.i == 0:
            self.tape["h0"] = hidden_states
        if self.stop_at(self.i):
            raise _Stop
        return hidden_states


class _Injector(nn.Module):
    """Stands in for decoder layer 0 in the head pass: returns the given final hidden states."""

    def __init__(self):
        super().__init__()
        self.h: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return self.h


class _Identity(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _ZeroEmbedding(nn.Module):
    """The head pass needs no embedding (layer 0's injector replaces its output): zeros of the right shape."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.hidden)


@dataclass
class LayerwiseModel:
    """A causal LM whose weights stay in ``source`` until a layer is run.

    ``linear_hook(name, x)`` (optional) is called with the input of every ``nn.Linear`` inside the decoder
    layers (``name`` = the HF weight name, e.g. ``model.layers.3.mlp.down_proj.weight``) and, in the head
    pass, of ``lm_head``.
    """

    source: TensorSource
    max_activation_bytes: int = DEFAULT_ACTIVATION_BYTES
    linear_hook: Callable[[str, torch.Tensor], None] | None = None
    progress: Callable[[str, int], None] | None = None
    _model: nn.Module = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        _fix_malloc_threshold()
        cfg = dict(self.source.config())
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise GGMergeError("config has no model_type", path=self.source.path)
        try:
            self.config = AutoConfig.for_model(model_type, **cfg)
        except (ValueError, KeyError) as exc:
            raise GGMergeError(f"transformers cannot build a {model_type!r} config: {exc}",
                               path=self.source.path) from None
        with _params_on_meta():
            self._model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self._model.eval()
        self._find_parts()
        self._names = set(self.source.names())

    # -- structure ---------------------------------------------------------------------------------
    def _find_parts(self) -> None:
        n = self.config.num_hidden_layers
        lists = [(name, m) for name, m in self._model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == n]
        if len(lists) != 1:
            raise GGMergeError(f"cannot find the {n} decoder layers in {type(self._model).__name__}",
                               path=self.source.path)
        self.layers_name, self._layers = lists[0]
        self._real_layers = list(self._layers)
        emb = self._model.get_input_embeddings()
        head = self._model.get_output_embeddings()
        names = {id(m): name for name, m in self._model.named_modules()}
        self.embed_name, self.head_name = names[id(emb)], names[id(head)]
        self._embed_parent, self._embed_attr = self._parent(self.embed_name)
        self.n_layers = n
        self.hidden = self.config.hidden_size

    def _parent(self, dotted: str) -> tuple[nn.Module, str]:
        *path, attr = dotted.split(".")
        mod = self._model
        for p in path:
            mod = getattr(mod, p)
        return mod, attr

    # -- weights -----------------------------------------------------------------------------------
    def _load_into(self, module: nn.Module, prefix: str) -> None:
        """Materialise every parameter of ``module`` (whose full name starts with ``prefix``) from the source."""
        sd = {}
        for pname, _ in module.named_parameters():
            full = f"{prefix}.{pname}" if prefix else pname
            src = full
            if src not in self._names and full == f"{self.head_name}.weight" and \
                    getattr(self.config, "tie_word_embeddings", False):
                src = f"{self.embed_name}.weight"
            if src not in self._names:
                raise GGMergeError("tensor missing from the model", path=self.source.path, tensor=full)
            t = self.source.load(src)
            shape = tuple(getattr(module.get_parameter(pname), "shape"))
            if tuple(t.shape) != shape:
                raise GGMergeError(f"shape {tuple(t.shape)}, the config implies {shape}",
                                   path=self.source.path, tensor=src)
            sd[pname] = t
        module.load_state_dict(sd, strict=False, assign=True)
        for p in module.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _unload(module: nn.Module) -> None:
        for mod in module.modules():
            for k, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[k] = nn.Parameter(p.to("meta"), requires_grad=False)

    def _rest_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules with parameters outside the layers, embedding and head (the final norm, …)."""
        skip = (self.layers_name + ".", self.embed_name, self.head_name)
        out = []
        for name, m in self._model.named_modules():
            if not name or name.startswith(skip) or name in skip:
                continue
            if any(True for _ in m.parameters(recurse=False)):
                out.append((name, m))
        return out

    @contextlib.contextmanager
    def _hooks(self, module: nn.Module, prefix: str) -> Iterator[None]:
        if self.linear_hook is None:
            yield
            return
        handles = []
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear):
                full = f"{prefix}.{name}.weight" if name else f"{prefix}.weight"
                handles.append(m.register_forward_pre_hook(
                    lambda _m, args, _n=full: self.linear_hook(_n, args[0])))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # -- the passes --------------------------------------------------------------------------------
    def group_size(self, ctx: int) -> int:
        per_chunk = ctx * self.hidden * 4
        return max(1, self.max_activation_bytes // per_chunk)

    def run(self, chunks: torch.Tensor, *, head_rows: slice | None = None,
            on_logits: Callable[[int, torch.Tensor], None] | None = None) -> None:
        """Run ``chunks`` (int64, [n, ctx]) through the model.

        With ``on_logits``, the head runs for rows ``head_rows`` of each chunk and ``on_logits(i, logits)``
        receives chunk ``i``'s float32 logits ([rows, vocab]), one chunk at a time, in order.
        """
        n, ctx = chunks.shape
        g = self.group_size(ctx)
        for start in range(0, n, g):
            self._run_group(chunks[start:start + g], start, head_rows, on_logits)

    def _run_group(self, chunks, offset, head_rows, on_logits) -> None:
        n = chunks.shape[0]
        tape: dict = {}
        real_layers = self._real_layers
        # 1. embeddings (+ whatever the model does before layer 0) and each layer's call arguments
        rest = self._rest_modules()
        self._load_into(self._embed_module(), self.embed_name)
        for name, m in rest:
            self._load_into_direct(m, name)
        try:
            hidden = torch.empty(n, chunks.shape[1], self.hidden)
            for i in range(n):
                first = i == 0
                stop = (lambda j: j == self.n_layers - 1) if first else (lambda j: True)
                for j in range(self.n_layers):
                    self._layers[j] = _Recorder(j, tape, stop)
                try:
                    with torch.no_grad():
                        self._model(input_ids=chunks[i:i + 1], use_cache=False)
                except _Stop:
                    pass
                hidden[i] = tape["h0"][0]
                if first:
                    layer_kwargs = dict(tape["kwargs"])
        finally:
            self._unload(self._embed_module())
            for _, m in rest:
                self._unload(m)
            for j in range(self.n_layers):
                self._layers[j] = real_layers[j]
        tape.clear()
        if self.progress:
            self.progress("embed", n)
        # 2. the decoder layers, one in memory at a time
        for j, layer in enumerate(real_layers):
            prefix = f"{self.layers_name}.{j}"
            self._load_into(layer, prefix)
            try:
                with torch.no_grad(), self._hooks(layer, prefix):
                    for i in range(n):
                        hidden[i] = layer(hidden[i:i + 1], **layer_kwargs[j])[0]
            finally:
                self._unload(layer)
            if self.progress:
                self.progress(f"layer {j}", n)
        if on_logits is None:
            return
        # 3. the head, one chunk's scored rows at a time
        rows = head_rows or slice(None)
        head = self._model.get_output_embeddings()
        injector = _Injector()
        saved_embed = getattr(self._embed_parent, self._embed_attr)
        setattr(self._embed_parent, self._embed_attr, _ZeroEmbedding(self.hidden))
        for j in range(self.n_layers):
            self._layers[j] = injector if j == 0 else _Identity()
        try:
            for name, m in rest:
                self._load_into_direct(m, name)
            self._load_into(head, self.head_name)
            with torch.no_grad(), self._hooks(head, self.head_name):
                for i in range(n):
                    h = hidden[i, rows].unsqueeze(0)
                    injector.h = h
                    dummy = torch.zeros(1, h.shape[1], dtype=torch.long)
                    logits = self._model(input_ids=dummy, use_cache=False).logits[0]
                    on_logits(offset + i, logits.float())
        finally:
            setattr(self._embed_parent, self._embed_attr, saved_embed)
            for j in range(self.n_layers):
                self._layers[j] = real_layers[j]
            for _, m in rest:
                self._unload(m)
            self._unload(head)
        if self.progress:
            self.progress("head", n)

    def _embed_module(self) -> nn.Module:
        return getattr(self._embed_parent, self._embed_attr)

    def _load_into_direct(self, module: nn.Module, name: str) -> None:
        """Like :meth:`_load_into` for the module's own parameters only (the final norm)."""
        sd = {}
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            if full not in self._names:
                raise GGMergeError("tensor missing from the model", path=self.source.path, tensor=full)
            sd[pname] = self.source.load(full)
        for pname, t in sd.items():
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)

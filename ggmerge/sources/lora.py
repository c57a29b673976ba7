"""``model+lora`` references: a source whose tensors are a model's with a PEFT LoRA adapter merged in.

mergekit resolves ``base+adapter`` (``ModelReference.merged``) by loading the model with transformers,
the adapter with PEFT, calling ``merge_and_unload`` and saving a merged copy of the whole model, which it
then reads like any other input. PEFT's merge of one LoRA layer (``lora.Linear.merge`` /
``lora.Embedding.merge`` and their ``get_delta_weight``, PEFT 0.21) is:

    Δ = (B @ A) · s             in float32 (PEFT loads adapter weights as float32),
                                s = lora_alpha / r, or lora_alpha / √r with ``use_rslora``
                                (``rank_pattern`` / ``alpha_pattern`` override r / alpha per module)
    W' = W + Δ                  for a Linear: ``weight.data += Δ``, so the float32 sum is rounded
                                once to the model's stored dtype

For an embedding the adapter stores ``lora_embedding_A`` (r × vocab) and ``lora_embedding_B``
(dim × r), Δ = (B @ A)ᵀ · s, and PEFT adds ``Δ.to(W.dtype)`` (Δ rounded first, then the sum). ``modules_to_save`` tensors replace the model's (in its dtype).

:class:`LoraSource` applies exactly that to each tensor as it is loaded, so nothing is written and only
the adapter (small) is held in memory. A tensor with a LoRA is merged whole (its delta is one matmul;
the last few results are kept, as the evaluator reads a tensor in row chunks); every other tensor is the
model's own, rows read as before. The adapter must be ``adapter_model.safetensors``: a pickled
``adapter_model.bin`` is refused, never opened. DoRA, LoRA biases and ``fan_in_fan_out`` (GPT-2-style
Conv1D layers, not in the Llama family) are refused with a clear error.
"""
from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..dtypes import FLOAT_STORAGE
from ..errors import GGMergeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.default)?\.weight$"
                       r"|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)(?:\.default)?$")
#: merged tensors kept for row reads (one per evaluator thread is enough; a few more cost little)
_KEEP = 4



def _pattern_value(patterns: dict, module: str, default):
    """PEFT ``get_pattern_key``: the first pattern whose regex matches the module name's tail."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: Path) -> tuple[dict, Path]:
    """The adapter's config and its safetensors file; GGMergeError for anything we cannot apply."""
    if not folder.is_dir():
        raise GGMergeError("LoRA adapter: no such folder", path=folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = [f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth")]
        if pickles:
            raise GGMergeError(f"LoRA adapter holds only PyTorch pickle weights ({', '.join(sorted(pickles))}); "
                               "ggmerge never unpickles files (they can run code). Save the adapter as "
                               f"{ADAPTER_WEIGHTS} (PEFT's default) on a machine and with code you trust.",
                               path=folder)
        raise GGMergeError(f"LoRA adapter: no {ADAPTER_WEIGHTS}", path=folder)
    cfg_path = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GGMergeError(f"LoRA adapter: no {ADAPTER_CONFIG}", path=folder) from None
    except (OSError, ValueError) as exc:
        raise GGMergeError(f"cannot read the adapter config: {exc}", path=cfg_path) from None
    if not isinstance(cfg, dict):
        raise GGMergeError("the adapter config is not a JSON object", path=cfg_path)
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise GGMergeError(f"peft_type {kind} is not a LoRA; ggmerge applies LoRA adapters only",
                           path=cfg_path, key="peft_type")
    for key, why in (("use_dora", "DoRA adapters"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) adapters"),
                     ("lora_bias", "LoRA biases")):
        if cfg.get(key):
            raise GGMergeError(f"{why} are not supported", path=cfg_path, key=key)
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise GGMergeError(f"'{key}' must be a positive number, got {v!r}", path=cfg_path, key=key)
    return cfg, weights


class LoraSource:
    """``inner`` (any TensorSource) with the LoRA adapter in ``adapter`` merged into its tensors."""

    def __init__(self, inner, adapter: Path, spec: str | None = None) -> None:
        self.inner = inner
        self.adapter = Path(adapter)
        self.spec = spec or f"{inner.path}+{adapter}"
        # the files themselves, joined as mergekit writes the reference (fingerprint.py splits it again)
        self.path = Path(f"{inner.path}+{self.adapter}")
        self.cfg, self.weights = read_adapter(self.adapter)
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, torch.Tensor] = OrderedDict()
        #: tensor name -> ("lora", A key, B key, scaling, embedding?) | ("replace", key)
        self._plan: dict[str, tuple] = {}
        try:
            with safe_open(str(self.weights), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        except (SafetensorError, OSError, ValueError) as exc:
            raise GGMergeError(f"cannot open as safetensors: {exc}", path=self.weights) from None
        self._plan_keys(keys, shapes)
        if hasattr(inner, "read_rows"):
            self.read_rows = self._read_rows

    # -- planning -------------------------------------------------------------------------------
    def _plan_keys(self, keys: list[str], shapes: dict) -> None:
        names = set(self.inner.names())
        pairs: dict[str, dict[str, str]] = {}
        to_save = self.cfg.get("modules_to_save") or []
        for key in keys:
            short = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _LORA_KEY.match(short)
            if m:
                module = m.group("module") or m.group("emodule")
                kind = (m.group("kind") or m.group("ekind"))[-1]  # 'A' or 'B'
                pairs.setdefault(module, {})[kind] = key
                pairs[module]["emb"] = "1" if m.group("ekind") else ""
                continue
            target = short.replace(".modules_to_save.default", "")
            module = target.rsplit(".", 1)[0]
            if target in names and any(module == t or module.endswith("." + t) for t in to_save):
                if shapes[key] != tuple(self.inner.shape(target)):
                    raise GGMergeError(f"modules_to_save tensor has shape {list(shapes[key])}, the model's "
                                       f"is {list(self.inner.shape(target))}", path=self.weights, tensor=key)
                self._plan[target] = ("replace", key)
                continue
            raise GGMergeError(f"adapter tensor '{key}' is neither a LoRA A/B matrix nor one of "
                               f"modules_to_save ({to_save}) of this model", path=self.weights, tensor=key)
        r0, alpha0 = self.cfg["r"], self.cfg["lora_alpha"]
        for module, p in sorted(pairs.items()):
            if "A" not in p or "B" not in p:
                raise GGMergeError(f"LoRA module '{module}' has lora_{'A' if 'A' not in p else 'B'} missing",
                                   path=self.weights, tensor=module)
            target = module + ".weight"
            if target not in names:
                raise GGMergeError(f"the adapter changes '{target}', which the model does not have "
                                   "(an adapter for another architecture?)", path=self.weights, tensor=target)
            emb = bool(p["emb"])
            a, b, w = shapes[p["A"]], shapes[p["B"]], tuple(self.inner.shape(target))
            rank = a[0] if len(a) == 2 else -1
            want_a, want_b = ((rank, w[0]), (w[1], rank)) if emb else ((rank, w[1]), (w[0], rank))
            if len(w) != 2 or a != want_a or b != want_b:
                raise GGMergeError(f"LoRA shapes A {list(a)}, B {list(b)} do not fit the model's {list(w)}",
                                   path=self.weights, tensor=target)
            r = _pattern_value(self.cfg.get("rank_pattern"), module, r0)
            alpha = _pattern_value(self.cfg.get("alpha_pattern"), module, alpha0)
            if r != rank:
                raise GGMergeError(f"LoRA rank {rank} in the file, {r} in {ADAPTER_CONFIG}",
                                   path=self.weights, tensor=target)
            # PEFT LoraLayer.update_layer: a Python float, the same value it multiplies by
            scaling = alpha / math.sqrt(r) if self.cfg.get("use_rslora") else alpha / r
            self._plan[target] = ("lora", p["A"], p["B"], scaling, emb)

    # -- TensorSource ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return self.inner.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def dtype(self, name: str) -> str:
        return self.inner.dtype(name)

    def config(self) -> dict:
        return self.inner.config()

    def tokenizer_dir(self) -> Path | None:
        return self.inner.tokenizer_dir()

    def close(self) -> None:
        self._kept.clear()
        self.inner.close()

    def changed(self) -> list[str]:
        """The model tensors the adapter changes."""
        return sorted(self._plan)

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        with safe_open(str(self.weights), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def _merged(self, name: str) -> torch.Tensor:
        """The whole merged tensor in the model's stored dtype (kept for a few following reads)."""
        with self._lock:
            t = self._kept.get(name)
            if t is not None:
                self._kept.move_to_end(name)
                return t
        stored = FLOAT_STORAGE.get(self.inner.dtype(name).upper())
        w = self.inner.load(name)
        if stored is not None:
            w = w.to(stored)
        plan = self._plan[name]
        if plan[0] == "replace":
            t = self._adapter_tensor(plan[1]).to(w.dtype)
        else:
            _, ka, kb, scaling, emb = plan
            a, b = self._adapter_tensor(ka).float(), self._adapter_tensor(kb).float()
            delta = b @ a
            if emb:
                delta = delta.T
            delta = delta * scaling
            if emb:  # lora.Embedding.merge: Δ rounded to W's dtype, then added
                t = w + delta.to(w.dtype)
            else:    # lora.Linear.merge: W += Δ in place, float32 Δ: one rounding of the float32 sum
                t = w.clone()
                t += delta
        with self._lock:
            self._kept[name] = t
            while len(self._kept) > _KEEP:
                self._kept.popitem(last=False)
        return t

    def load(self, name: str) -> torch.Tensor:
        if name not in self._plan:
            return self.inner.load(name)
        return self._merged(name).float()

    def _read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self._plan:
            return self.inner.read_rows(name, r0, r1, out)
        rows = self._merged(name)[r0:r1]
        if out is None:
            return rows.clone()
        return out.view(rows.shape).copy_(rows)

    def __repr__(self) -> str:
        return f"LoraSource({self.inner!r} + {str(self.adapter)!r}, {len(self._plan)} tensors changed)"

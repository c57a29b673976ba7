"""Tensor sources: every input format behind the one :class:`~ggmerge.sources.base.TensorSource` protocol.

``open_source`` is the only entry point the rest of ggmerge needs: give it what the user wrote (a model
folder, a ``.safetensors`` file, a ``.gguf`` file, or a Hub id) and it returns a source.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import GGMergeError
from .base import TensorSource
from .hub import hub_cache_dir, parse_hub_id, resolve_hub_id
from .safetensors import INDEX_NAME, SafetensorsSource

__all__ = [
    "TensorSource", "SafetensorsSource", "GGUFSource", "open_source", "resolve_hub_id",
    "parse_hub_id", "hub_cache_dir",
]

def __getattr__(name: str):
    # gguf-py (and the tokenizer libraries it pulls in) load only when a GGUF file is opened: a merge of
    # safetensors models starts ~0.6 s sooner
    if name == "GGUFSource":
        from .gguf import GGUFSource

        return GGUFSource
    raise AttributeError(name)


#: pickle-based checkpoints: loading them runs arbitrary code, so they are refused, never opened
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickles(where: Path, files: list[Path]) -> GGMergeError:
    names = ", ".join(sorted(f.name for f in files)[:3])
    return GGMergeError(
        f"holds only PyTorch pickle weights ({names}); ggmerge never unpickles files (they can run "
        "code). Convert them to safetensors first, on a machine and with code you trust.",
        path=where)


def _open_folder(folder: Path) -> TensorSource:
    if (folder / INDEX_NAME).is_file() or any(folder.glob("*.safetensors")):
        return SafetensorsSource(folder)
    pickles = [f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _refuse_pickles(folder, pickles)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        from .gguf import GGUFSource

        return GGUFSource(ggufs[0])
    if ggufs:
        raise GGMergeError(f"holds {len(ggufs)} GGUF files; name the one to use "
                           f"(e.g. {ggufs[0]})", path=folder)
    raise GGMergeError("is not a model folder (no *.safetensors, no model.safetensors.index.json)",
                       path=folder)


def _local_or_hub(part: str, root: Path | None, offline: bool) -> Path | str:
    p = Path(os.path.expanduser(part))
    if not p.is_absolute() and root is not None and (root / p).exists():
        return root / p
    if p.exists() or parse_hub_id(part) is None or part.startswith((".", "/", "~")):
        return p
    return part


def _open_with_lora(spec: str, root: Path | None, offline: bool) -> TensorSource:
    """mergekit's ``model+lora`` reference (``ModelReference.validate_string``: exactly one '+')."""
    from .lora import LoraSource

    parts = spec.split("+")
    if len(parts) != 2 or not all(parts):
        raise GGMergeError("a LoRA reference is 'MODEL+ADAPTER' (one '+')", path=Path(spec))
    model = open_source(_local_or_hub(parts[0], root, offline), offline=offline)
    adapter = _local_or_hub(parts[1], root, offline)
    if isinstance(adapter, str):
        adapter = resolve_hub_id(adapter, offline=offline)
    return LoraSource(model, Path(adapter), spec)


def open_source(spec: str | os.PathLike, *, offline: bool = True, root: Path | None = None) -> TensorSource:
    """Open ``spec`` as a tensor source.

    ``spec`` may be an HF model folder (``config.json`` + ``*.safetensors``, sharded or not), a single
    ``.safetensors`` file (config from its folder), a ``.gguf`` file, or a Hub id ``org/name`` /
    ``org/name@revision`` looked up in the local HF cache (downloaded when ``offline`` is False).
    A local path wins over a Hub id of the same spelling.
    ``MODEL+ADAPTER`` (mergekit's LoRA reference) opens MODEL with the PEFT LoRA adapter folder ADAPTER
    merged in (:class:`~ggmerge.sources.lora.LoraSource`); relative parts are looked up under ``root``
    (the recipe's folder) first.
    """
    path = Path(os.path.expanduser(str(spec)))
    if "+" in str(spec) and not path.exists():
        return _open_with_lora(str(spec), root, offline)
    if path.is_dir():
        return _open_folder(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return SafetensorsSource(path)
        if suffix == ".gguf":
            from .gguf import GGUFSource

            return GGUFSource(path)
        if path.name == INDEX_NAME:
            return SafetensorsSource(path.parent)
        if suffix in PICKLE_SUFFIXES:
            raise _refuse_pickles(path, [path])
        raise GGMergeError("unknown model file type (expected a folder, .safetensors or .gguf)", path=path)
    if parse_hub_id(str(spec)) is not None and not str(spec).startswith((".", "/", "~")):
        return _open_folder(resolve_hub_id(str(spec), offline=offline))
    raise GGMergeError("no such file or folder, and not a Hub id ('org/name')", path=path)

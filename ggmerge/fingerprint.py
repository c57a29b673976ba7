"""Content hashes of inputs and outputs, recorded in every build for reproducibility.

Files inside the HF cache are LFS blobs already named by their SHA-256 and are not read at all. Any other
input file larger than ``SAMPLE_MIN`` gets, by default, a *sampled* fingerprint — SHA-256 over its size,
its first and last MiB (the safetensors/GGUF header with every tensor's name, shape and offset) and 16 KiB
at 256 evenly spaced places — recorded as ``sampled-sha256:<hex>``: it changes when the file does in
practice (a fine-tune changes every tensor), costs 6 MiB of reading instead of a second pass over a
15 GB checkpoint, and is the same on every machine. ``full=True`` (``ggmerge build --hash-inputs``) reads
whole files for real SHA-256s. Full hashes are cached by (path, size, mtime) in
``~/.cache/ggmerge/hashes.json`` and used whenever known.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 22

MODEL_FILES = ("*.safetensors", "*.gguf", "config.json", "tokenizer.model", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
               "adapter_config.json")


def _cache_path() -> Path:
    root = os.environ.get("GGMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ggmerge")
    return Path(root) / "hashes.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    p = _cache_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, p)
    except OSError:
        pass  # a cache we cannot write only costs time


#: files at most this large are always hashed whole
SAMPLE_MIN = 16 << 20
SAMPLED = "sampled-sha256:"
_SAMPLES, _SAMPLE = 256, 1 << 14


def sampled_sha256(path: str | os.PathLike) -> str:
    """``sampled-sha256:<hex>`` of a large file (see the module docstring)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        h.update(f"{size}\n".encode())
        spans = [(0, 1 << 20), (max(0, size - (1 << 20)), 1 << 20)]
        spans += [(size * i // (_SAMPLES + 1), _SAMPLE) for i in range(1, _SAMPLES + 1)]
        for offset, n in spans:
            h.update(os.pread(f.fileno(), n, offset))
    return SAMPLED + h.hexdigest()


def file_digest(path: str | os.PathLike, *, full: bool = False, cache: dict | None = None) -> str:
    """The SHA-256 of ``path`` when it is known for free (HF blob name, cache), small, or ``full`` is
    asked; else its sampled fingerprint."""
    real = Path(path).resolve()
    if _HEX64.match(real.name) and real.parent.name == "blobs":
        return real.name
    st = real.stat()
    if full or st.st_size <= SAMPLE_MIN:
        return sha256_file(real, cache=cache)
    known = (cache if cache is not None else _load_cache()).get(f"{real}:{st.st_size}:{st.st_mtime_ns}")
    return known or sampled_sha256(real)


def sha256_file(path: str | os.PathLike, *, cache: dict | None = None) -> str:
    path = Path(path)
    real = path.resolve()
    if _HEX64.match(real.name) and real.parent.name == "blobs":
        return real.name  # huggingface_hub stores LFS files under their SHA-256
    st = real.stat()
    key = f"{real}:{st.st_size}:{st.st_mtime_ns}"
    own = cache is None
    cache = _load_cache() if own else cache
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    cache[key] = h.hexdigest()
    if own:
        _save_cache(cache)
    return cache[key]


def model_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    out: set[Path] = set()
    for pat in MODEL_FILES:
        out.update(p for p in path.glob(pat) if p.is_file())
    return sorted(out)


def fingerprint(path: str | os.PathLike, *, full: bool = False) -> dict[str, str]:
    """{relative file name: digest} for a model folder or file (see :func:`file_digest`)."""
    path = Path(path)
    if not path.exists() and "+" in str(path):  # MODEL+ADAPTER (sources/lora.py): both parts
        model, adapter = str(path).rsplit("+", 1)
        return fingerprint(model, full=full) | {
            f"+adapter/{k}": v for k, v in fingerprint(adapter, full=full).items()}
    cache = _load_cache()
    out = {}
    for f in model_files(path):
        rel = f.name if path.is_file() else str(f.relative_to(path))
        out[rel] = file_digest(f, full=full, cache=cache)
    _save_cache(cache)
    return out


def combined(hashes: dict[str, str]) -> str:
    """One SHA-256 over a {name: sha256} mapping (order-independent)."""
    h = hashlib.sha256()
    for k in sorted(hashes):
        h.update(f"{k}\0{hashes[k]}\n".encode())
    return h.hexdigest()

"""Content hashes of inputs and outputs, recorded in every build for reproducibility.

Hashing a 15 GB checkpoint takes a while, so file hashes are cached by (path, size, mtime) in
``~/.cache/ggmerge/hashes.json``; files inside the HF cache are LFS blobs already named by their
SHA-256 and are not re-read.
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
               "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


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


def fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """{relative file name: sha256} for a model folder or file."""
    path = Path(path)
    cache = _load_cache()
    out = {}
    for f in model_files(path):
        rel = f.name if path.is_file() else str(f.relative_to(path))
        out[rel] = sha256_file(f, cache=cache)
    _save_cache(cache)
    return out


def combined(hashes: dict[str, str]) -> str:
    """One SHA-256 over a {name: sha256} mapping (order-independent)."""
    h = hashlib.sha256()
    for k in sorted(hashes):
        h.update(f"{k}\0{hashes[k]}\n".encode())
    return h.hexdigest()

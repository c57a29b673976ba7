"""Hugging Face Hub ids (``org/name`` or ``org/name@revision``) resolved to a local snapshot folder.

Resolution goes through ``huggingface_hub.snapshot_download``: with ``local_files_only=True`` it only
looks in the cache (``models--org--name/refs/<revision>`` → ``snapshots/<commit>/``), which is what a
merge does by default, so a recipe naming ``Aratako/Ninja-v1-RP`` works offline once the model has been
downloaded. The cache location is read from the environment at call time (``HF_HUB_CACHE``, then
``HF_HOME``), not frozen at import as ``huggingface_hub.constants`` is.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..errors import GGMergeError

log = logging.getLogger(__name__)

_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")

#: what an online resolution downloads: weights as safetensors, configs, tokenizer files. Never pickles.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "merges.txt"]


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``spec`` is shaped like a Hub id, else None."""
    m = _ID.match(str(spec))
    if not m or "--" in m.group("repo") or ".." in m.group("repo"):
        return None
    return m.group("repo"), m.group("rev")


def hub_cache_dir() -> Path:
    """The HF hub cache folder as the environment names it now (HF_HUB_CACHE > HF_HOME/hub > default)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def resolve_hub_id(spec: str, *, offline: bool = True) -> Path:
    """The local snapshot folder of Hub id ``spec`` (``org/name`` or ``org/name@revision``).

    Offline (the default) only the cache is consulted and a missing model is a GGMergeError naming
    the id; with ``offline=False`` the safetensors/config/tokenizer files are downloaded if needed.
    """
    parsed = parse_hub_id(spec)
    if parsed is None:
        raise GGMergeError("not a Hugging Face Hub id (expected 'org/name' or 'org/name@revision')",
                           key=str(spec))
    repo_id, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise GGMergeError("huggingface_hub is not installed; cannot resolve Hub ids", key=spec) from None
    cache = hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                   local_files_only=offline, allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError:
        rev = f" at revision '{revision}'" if revision else ""
        hint = ("download it first (`hf download " + repo_id + "`) or allow downloads"
                if offline else "it could not be downloaded")
        raise GGMergeError(f"model '{repo_id}'{rev} is not in the local Hugging Face cache; {hint}",
                           path=cache, key=spec) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise GGMergeError(f"cannot resolve Hub model '{repo_id}': {exc}", path=cache, key=spec) from None
    log.info("%s → %s", spec, folder)
    return Path(folder)

"""Session-scoped fixtures wrapping tests/models.py (build each tiny model once per test run)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402


@pytest.fixture(scope="session")
def spm_v1() -> Path:
    """Path of the real Mistral v1 tokenizer.model."""
    return models.spm_v1_path()


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    """The standard tiny Mistral (GQA 4/2, hidden 64, 2 layers, real v1 vocab, bf16 safetensors)."""
    return models.make_tiny_mistral(tmp_path_factory.mktemp("tiny_mistral") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_mistral_sharded(tmp_path_factory) -> Path:
    """Same recipe as ``tiny_mistral`` but written as 3 safetensors shards with an index."""
    return models.make_tiny_mistral(tmp_path_factory.mktemp("tiny_sharded") / "model", seed=0, shards=3)


@pytest.fixture(scope="session")
def tiny_mistral_tied(tmp_path_factory) -> Path:
    """Tied embeddings (no lm_head.weight), and 32002 embedding rows for 32000 tokens (padding)."""
    return models.make_tiny_mistral(
        tmp_path_factory.mktemp("tiny_tied") / "model", seed=3, tie_embeddings=True, vocab=32002
    )


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """A base and two related fine-tunes (base + 2 % noise) for merge tests: {'base', 'ft1', 'ft2'}."""
    root = tmp_path_factory.mktemp("tiny_family")
    base = models.make_tiny_mistral(root / "base", seed=0)
    return {
        "base": base,
        "ft1": models.make_tiny_mistral(root / "ft1", seed=1, perturb_from=base, scale=0.02),
        "ft2": models.make_tiny_mistral(root / "ft2", seed=2, perturb_from=base, scale=0.02),
    }


@pytest.fixture(scope="session")
def seed_conversation() -> list[dict]:
    return [dict(m) for m in models.SEED_CONVERSATION]


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory):
    """Builds cache input hashes under ~/.cache/ggmerge; tests keep theirs in a tmp dir instead."""
    import os

    old = os.environ.get("GGMERGE_CACHE")
    os.environ["GGMERGE_CACHE"] = str(tmp_path_factory.mktemp("ggmerge-cache"))
    yield
    if old is None:
        os.environ.pop("GGMERGE_CACHE", None)
    else:
        os.environ["GGMERGE_CACHE"] = old

"""Real texts for perplexity / imatrix tests, shipped by packages the project depends on (never written
by hand, never downloaded)."""
from __future__ import annotations

from importlib.metadata import distribution
from pathlib import Path


def numpy_license() -> Path:
    """numpy's LICENSE.txt (~48 KB of real license prose: numpy's BSD licence and the licences of the
    libraries its wheels bundle); ~12k tokens with the Mistral vocabulary."""
    d = distribution("numpy")
    for f in d.files or ():
        if str(f).endswith(".dist-info/LICENSE.txt"):
            return Path(d.locate_file(f))
    raise FileNotFoundError("numpy's LICENSE.txt")

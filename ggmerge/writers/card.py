"""The model card (README.md) of a merged model: lineage, the recipe that built it, and file hashes.

The YAML front matter follows the Hub's model-card metadata (``base_model``, ``tags``,
``library_name``) so the Hub links the merge to its parents. Only entries that are Hub ids go into
``base_model`` (local paths are not valid there); every input is listed in the body.
"""
from __future__ import annotations

import yaml

from ..sources.hub import parse_hub_id


def _fence(text: str) -> str:
    """A backtick fence longer than any run of backticks inside ``text``."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _hash_rows(kind: str, hashes: dict) -> list[str]:
    return [f"| {kind} | `{name}` | `{digest}` |" for name, digest in hashes.items()]


def model_card(name: str, recipe_text: str, lineage: list[str], input_hashes: dict[str, str],
               output_hashes: dict[str, str]) -> str:
    """README.md text for merged model ``name``.

    ``lineage`` lists the models the recipe reads (Hub ids or paths), ``input_hashes`` / ``output_hashes``
    map a file name to its SHA-256 hex digest.
    """
    hub_ids = []
    for item in lineage:
        parsed = parse_hub_id(item)
        if parsed is not None and not str(item).startswith((".", "/", "~")) and parsed[0] not in hub_ids:
            hub_ids.append(parsed[0])
    front: dict = {}
    if hub_ids:
        front["base_model"] = hub_ids
    front["tags"] = ["merge", "ggmerge"]
    front["library_name"] = "transformers"
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {name}", "",
             "This model is a merge of pre-trained language models, built with ggmerge "
             "from the recipe below.", ""]
    if lineage:
        lines += ["## Merged models", ""] + [f"- {item}" for item in lineage] + [""]
    fence = _fence(recipe_text)
    lines += ["## Recipe", "", f"{fence}yaml", recipe_text.rstrip("\n"), fence, ""]
    if input_hashes or output_hashes:
        lines += ["## Files (SHA-256)", "", "| role | file | sha256 |", "|---|---|---|"]
        lines += _hash_rows("input", input_hashes) + _hash_rows("output", output_hashes) + [""]
    return "\n".join(lines)

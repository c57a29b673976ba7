"""The seed's three-stage merge (Ninja-v1-RP-expressive), for ggmerge and for mergekit.

Stage 1: five task-arithmetic models on the base Mistral-7B-v0.1 — Antler + 0.8·(Instruct − base) (the
"chat vector" model Antler-7B-CV) and, for each of the four English RP models, Antler + 0.8·(Instruct − base)
+ 0.8·(RP − base). Stage 2: model_stock of those five on Antler-7B-CV (tokenizer union). Stage 3:
dare_ties of the model_stock result onto Ninja-v1-RP (density 0.7, weight 0.5, tokenizer union). All bf16.

ggmerge gets it as ONE multi-document recipe (named intermediate stages, streamed, nothing written in
between); mergekit gets the same documents as seven separate ``mergekit-yaml`` configs run one after the
other with the intermediate models written to disk — what users of the seed do today.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from make_models import ANTLER, BASE, INSTRUCT, NINJA, RP_MODELS

#: RP model folder → the seed's name for its task-vector model
CV_NAMES = {
    "WestLake-7B-v2": "Antler-7B-CV-WestLake",
    "Kunoichi-DPO-v2-7B": "Antler-7B-CV-Kunoichi",
    "Silicon-Maid-7B": "Antler-7B-CV-SiliconMaid",
    "Loyal-Macaroni-Maid-7B": "Antler-7B-CV-LoyalMacaroniMaid",
}
CV = "Antler-7B-CV"
MS = "Antler-7B-MS"
SEED = 0


@dataclass
class StageDoc:
    name: str          # the stage's model name ("" for the final output)
    doc: dict          # the mergekit configuration, with references as given by ``ref``


def stage_docs(models: Path, ref) -> list[StageDoc]:
    """The seven configurations in dependency order. ``ref(stage_name)`` spells a reference to an
    intermediate stage (a stage name for ggmerge, an output folder for mergekit); leaf models are
    absolute folder paths (local paths only: mergekit's model-card step calls the Hub for ``org/name``)."""
    m = lambda d: str((Path(models) / d).resolve())
    docs = [StageDoc(CV, {
        "merge_method": "task_arithmetic",
        "base_model": m(BASE),
        "models": [
            {"model": m(ANTLER), "parameters": {"weight": 1.0}},
            {"model": m(INSTRUCT), "parameters": {"weight": 0.8}},
        ],
        "dtype": "bfloat16",
    })]
    for rp in RP_MODELS:
        docs.append(StageDoc(CV_NAMES[rp], {
            "merge_method": "task_arithmetic",
            "base_model": m(BASE),
            "models": [
                {"model": m(ANTLER), "parameters": {"weight": 1.0}},
                {"model": m(INSTRUCT), "parameters": {"weight": 0.8}},
                {"model": m(rp), "parameters": {"weight": 0.8}},
            ],
            "dtype": "bfloat16",
        }))
    docs.append(StageDoc(MS, {
        "models": [{"model": ref(CV)}] + [{"model": ref(CV_NAMES[rp])} for rp in RP_MODELS],
        "merge_method": "model_stock",
        "base_model": ref(CV),
        "dtype": "bfloat16",
        "tokenizer_source": "union",
    }))
    docs.append(StageDoc("", {
        "models": [
            {"model": m(NINJA)},
            {"model": ref(MS), "parameters": {"density": 0.7, "weight": 0.5}},
        ],
        "merge_method": "dare_ties",
        "base_model": m(NINJA),
        "dtype": "bfloat16",
        "tokenizer_source": "union",
    }))
    return docs


def _dump(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=200)


def ggmerge_recipe(models: Path, name: str = "Ninja-v1-RP-expressive") -> str:
    """One multi-document recipe: named stages first, the unnamed output last."""
    parts = []
    for sd in stage_docs(models, ref=lambda stage: stage):
        doc = dict(sd.doc)
        if sd.name:
            doc = {"name": sd.name, **doc}
        else:
            doc["ggmerge"] = {"name": name, "seed": SEED}
        parts.append(_dump(doc))
    return "---\n".join(parts)


def mergekit_stages(models: Path, work: Path) -> list[tuple[str, str, Path]]:
    """(stage name, mergekit-yaml config text, output folder) in the order to run them."""
    out_of = lambda stage: work / (stage or "Ninja-v1-RP-expressive")
    return [(sd.name or "output", _dump(sd.doc), out_of(sd.name))
            for sd in stage_docs(models, ref=lambda stage: str(out_of(stage)))]


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description="print the seed recipe for ggmerge, or mergekit's stage configs")
    ap.add_argument("models", type=Path, help="folder made by make_models.py")
    ap.add_argument("--mergekit", type=Path, metavar="WORK", help="print mergekit's per-stage configs instead")
    a = ap.parse_args()
    if a.mergekit:
        for name, text, out in mergekit_stages(a.models, a.mergekit):
            print(f"# {name} → {out}\n{text}")
    else:
        print(ggmerge_recipe(a.models), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

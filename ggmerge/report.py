"""Human-readable reports (dry-run plans, inspections) printed with rich to stdout."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

import sys

# piped output (logs, CI, tests) is not wrapped to 80 columns: wide tables stay whole
out = Console(width=None if sys.stdout.isatty() else 160)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def print_plan(d: dict, output: Path) -> None:
    out.print(f"[bold]Plan for {d['name']}[/bold]  (recipe {d['recipe']})")
    t = Table(title="Stages (evaluated per tensor, in this order)")
    for col in ("stage", "method", "base", "models", "tokenizer", "tensors"):
        t.add_column(col)
    for s in d["stages"]:
        t.add_row(s["name"], s["method"], str(s["base"] or "-"), "\n".join(s["models"]), s["tokenizer"],
                  str(s["tensors"]))
    out.print(t)
    ti = Table(title="Inputs")
    ti.add_column("reference")
    ti.add_column("resolved to")
    for ref, path in d["inputs"].items():
        ti.add_row(ref, path)
    out.print(ti)
    out.print(f"output tensors: {d['output_tensors']}   parameters: {d['parameters']:,}   "
              f"vocab size: {d['vocab_size']}")
    out.print(f"disk needed for {output}: ~{human_bytes(d['disk_bytes'])}   "
              f"peak memory (estimate, anonymous): ~{human_bytes(d['peak_memory_bytes'])}")
    out.print("no intermediate model is written; nothing was written by this dry run.")


def print_json(obj) -> None:
    """Machine-readable output (``--json``): one JSON document on stdout, nothing else there."""
    import json

    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()

"""Do two GGUF files hold the same tensors, byte for byte? (gguf-py's reader; metadata is reported, not required.)

    python tools/bench/compare_gguf.py A.gguf B.gguf
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Comparison:
    tensors: int = 0
    identical: int = 0
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    #: name → "type A vs type B" or "N of M bytes differ"
    differ: dict[str, str] = field(default_factory=dict)
    #: metadata keys whose values differ (general.* and tokenizer details are informative only)
    kv_differ: list[str] = field(default_factory=list)

    @property
    def same_bytes(self) -> bool:
        return not (self.only_a or self.only_b or self.differ)


def _kv(reader) -> dict[str, object]:
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = f.contents()
        except Exception:  # noqa: BLE001 - an unreadable value still compares by its raw parts
            out[name] = [bytes(p) for p in f.parts]
    return out


def compare(a_path, b_path) -> Comparison:
    from gguf import GGUFReader

    a, b = GGUFReader(a_path), GGUFReader(b_path)
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    c = Comparison(tensors=len(ta))
    c.only_a = sorted(set(ta) - set(tb))
    c.only_b = sorted(set(tb) - set(ta))
    for name in ta.keys() & tb.keys():
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            c.differ[name] = f"{x.tensor_type.name}{list(x.shape)} vs {y.tensor_type.name}{list(y.shape)}"
            continue
        xb = np.asarray(x.data).view(np.uint8).reshape(-1)
        yb = np.asarray(y.data).view(np.uint8).reshape(-1)
        if xb.size != yb.size:
            c.differ[name] = f"{xb.size} vs {yb.size} bytes"
        elif not np.array_equal(xb, yb):
            c.differ[name] = f"{int(np.count_nonzero(xb != yb))} of {xb.size} bytes differ ({x.tensor_type.name})"
        else:
            c.identical += 1
    ka, kb = _kv(a), _kv(b)
    c.kv_differ = sorted(k for k in ka.keys() | kb.keys() if ka.get(k) != kb.get(k))
    return c


def main() -> int:
    c = compare(sys.argv[1], sys.argv[2])
    print(json.dumps({**asdict(c), "same_bytes": c.same_bytes}, indent=2, default=str))
    return 0 if c.same_bytes else 1


if __name__ == "__main__":
    sys.exit(main())

"""``ggmerge inspect``: what is inside a GGUF file or an HF model folder."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.table import Table

from .errors import GGMergeError
from .report import human_bytes, out


def inspect(path: str, *, tensors: bool = False) -> dict:
    """Print and return architecture, vocabulary, chat template, special tokens and tensor types/sizes."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        info = _gguf(p)
    elif p.is_dir():
        info = _hf(p)
    else:
        raise GGMergeError("expected a .gguf file or an HF model folder", path=p)
    _print(info, tensors)
    return info


def _gguf(p: Path) -> dict:
    from .sources.gguf_data import open_reader
    from .tokenizer.gguf_vocab import read_gguf
    import gguf

    reader = open_reader(p)
    field = reader.get_field

    def kv(key):
        f = field(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 - a display helper: show what can be read
            return None

    arch = kv("general.architecture")
    vocab = read_gguf(reader)
    rows = []
    for t in reader.tensors:
        rows.append((t.name, t.tensor_type.name, [int(x) for x in reversed(list(t.shape))], int(t.n_bytes)))
    ftype = kv("general.file_type")
    return {
        "path": str(p), "format": "GGUF", "architecture": arch, "name": kv("general.name"),
        "file_type": gguf.LlamaFileType(ftype).name if ftype is not None else None,
        "hparams": {k: kv(f"{arch}.{k}") for k in ("context_length", "embedding_length", "block_count",
                                                   "feed_forward_length", "attention.head_count",
                                                   "attention.head_count_kv", "rope.freq_base")},
        "vocab": _vocab_info(vocab), "tensors": rows,
    }


def _hf(p: Path) -> dict:
    from .sources import open_source
    from .tokenizer.hf_vocab import read_hf

    src = open_source(p)
    try:
        cfg = src.config()
        rows = []
        for n in src.names():
            shape = list(src.shape(n))
            dt = src.dtype(n)
            numel = 1
            for s in shape:
                numel *= s
            rows.append((n, dt, shape, numel * {"F32": 4, "F16": 2, "BF16": 2}.get(dt, 2)))
        tdir = src.tokenizer_dir()
        vocab = read_hf(tdir) if tdir is not None else None
    finally:
        src.close()
    return {
        "path": str(p), "format": "HF", "architecture": (cfg.get("architectures") or ["?"])[0],
        "name": p.name, "file_type": None,
        "hparams": {k: cfg.get(k) for k in ("max_position_embeddings", "hidden_size", "num_hidden_layers",
                                            "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                            "rope_theta", "vocab_size")},
        "vocab": _vocab_info(vocab) if vocab else None, "tensors": rows,
    }


def _vocab_info(v) -> dict:
    def tok(i):
        return None if i is None or i < 0 or i >= len(v.tokens) else f"{i} {v.tokens[i]!r}"

    return {"model": v.model, "size": len(v.tokens), "pre": v.pre, "bos": tok(v.bos_id), "eos": tok(v.eos_id),
            "unk": tok(v.unk_id), "pad": tok(v.pad_id), "add_bos": v.add_bos, "add_eos": v.add_eos,
            "chat_template": v.chat_template}


def _print(info: dict, tensors: bool) -> None:
    out.print(f"[bold]{info['path']}[/bold]  ({info['format']}, {info['architecture']}"
              + (f", {info['file_type']}" if info.get("file_type") else "") + ")")
    for k, v in info["hparams"].items():
        if v is not None:
            out.print(f"  {k}: {v}")
    v = info.get("vocab")
    if v:
        out.print(f"  vocab: {v['model']}, {v['size']} tokens" + (f", pre-tokenizer {v['pre']}" if v["pre"] else ""))
        out.print(f"  special: bos={v['bos']} eos={v['eos']} unk={v['unk']} pad={v['pad']} "
                  f"add_bos={v['add_bos']} add_eos={v['add_eos']}")
        tmpl = v["chat_template"]
        out.print("  chat template: " + (f"{len(tmpl)} chars: {tmpl[:120]!r}…" if tmpl else "none"))
    rows = info["tensors"]
    by_type = Counter()
    size_by_type = Counter()
    for _, t, _, nb in rows:
        by_type[t] += 1
        size_by_type[t] += nb
    table = Table(title=f"{len(rows)} tensors, {human_bytes(sum(r[3] for r in rows))}")
    table.add_column("type")
    table.add_column("tensors", justify="right")
    table.add_column("bytes", justify="right")
    for t, n in by_type.most_common():
        table.add_row(t, str(n), human_bytes(size_by_type[t]))
    out.print(table)
    if tensors:
        tt = Table()
        for c in ("name", "type", "shape", "bytes"):
            tt.add_column(c)
        for name, t, shape, nb in rows:
            tt.add_row(name, t, str(shape), human_bytes(nb))
        out.print(tt)

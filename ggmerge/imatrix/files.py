"""llama.cpp's importance-matrix files: read both formats, write the GGUF one, derive quantizer weights.

Two formats exist (``tools/imatrix/imatrix.cpp`` writes them, ``common/imatrix-loader.cpp`` reads them):

* **GGUF** (the default since 2025): ``general.type = "imatrix"``, ``imatrix.datasets`` (array of
  strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32), and per weight two F32
  tensors, sorted by name: ``<name>.in_sum2`` of shape ``[n_cols, n_mat]`` (the raw sum of squared
  activations per input column, one row per expert; ``n_mat`` is 1 for a plain matmul) and
  ``<name>.counts`` of shape ``[1, n_mat]`` (how many activation rows were summed, per expert).
* **legacy .dat**: ``int32 n_entries``, then per entry ``int32 len, name, int32 ncall, int32 nval,
  float[nval]`` where the floats are already ``sum / count * ncall``; then optionally ``int32
  chunk_count, int32 len, dataset``.

llama-quantize (``load_imatrix`` in ``tools/quantize/quantize.cpp``) turns an entry into one float32
weight per input column (experts stacked): GGUF ``sum / float(count)`` per expert — 1 where an expert
saw no rows — and legacy ``value / float(ncall)`` (the value itself if ``ncall <= 0``). Those are
:attr:`Imatrix.weights`. It also records four ``quantize.imatrix.*`` keys in its output
(:meth:`Imatrix.quantize_kvs`).

Files come from strangers: every count and length is checked against the bytes present and fixed
bounds (``ggmerge.limits``) before anything is allocated; a bad file is one :class:`GGMergeError`.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import GGMergeError
from ..limits import GGML_MAX_NAME, MAX_KEY_BYTES, MAX_STRING_BYTES, MAX_TENSORS

KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"

#: what llama-quantize writes into the quantized GGUF (LLM_KV_QUANTIZE_IMATRIX_* in quantize.cpp)
KV_QUANTIZE_FILE = "quantize.imatrix.file"
KV_QUANTIZE_DATASET = "quantize.imatrix.dataset"
KV_QUANTIZE_ENTRIES = "quantize.imatrix.entries_count"
KV_QUANTIZE_CHUNKS = "quantize.imatrix.chunks_count"
#: llama_model_kv_override.val_str is char[128]: quantize.cpp copies at most 127 bytes
_KV_OVERRIDE_STR_BYTES = 127

#: input columns of one weight times its experts. The widest real matmuls have ~10^5 columns and
#: MoE models up to a few hundred experts; this bounds a legacy entry claiming billions of floats.
MAX_IMATRIX_VALUES = 1 << 28

_ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT: llama-imatrix sets no general.alignment


@dataclass(frozen=True)
class ImatrixEntry:
    """One weight's statistics as stored: ``sums`` float32 (``n_mat * n_cols``, expert-major),
    ``counts`` int64 per expert (GGUF), or the single ``ncall`` (legacy, where ``sums`` is already
    ``mean * ncall``)."""

    sums: np.ndarray
    counts: np.ndarray


@dataclass
class Imatrix:
    """An imatrix file as llama-quantize sees it."""

    path: Path
    #: raw entries by GGUF weight name (``blk.0.attn_q.weight``)
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    #: tokens per chunk (GGUF files; 0 for legacy files, which do not record it)
    chunk_size: int = 0
    is_legacy: bool = False
    #: per-column float32 weights by weight name, as quantize.cpp's ``load_imatrix`` computes them
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def for_tensor(self, name: str, n_cols: int, n_experts: int = 1) -> np.ndarray | None:
        """The weights for one tensor about to be quantized, or None where llama-quantize uses none.

        Mirrors ``llama_model_quantize_impl``: no entry → None; an entry whose length is not
        ``ne[0] * ne[2]`` is an error, except for ``token_embd`` (silently quantized without).
        The result is ``(n_experts, n_cols)``: expert ``e`` uses row ``e``.
        """
        w = self.weights.get(name)
        if w is None:
            return None
        if w.size != n_cols * n_experts:
            if name.startswith("token_embd."):
                return None
            raise GGMergeError(f"imatrix has {w.size} values for this tensor, which needs {n_cols * n_experts} "
                               f"({n_cols} columns × {n_experts} expert(s)): the imatrix was made for another "
                               "model", path=self.path, tensor=name)
        return w.reshape(n_experts, n_cols)

    def quantize_kvs(self, given_path: str) -> list[tuple[str, object, str]]:
        """The ``quantize.imatrix.*`` metadata llama-quantize appends to its output, in its order:
        (key, value, "str"|"u32"). ``given_path`` is the path as the user spelt it (llama-quantize
        records its ``--imatrix`` argument verbatim, cut to 127 bytes)."""
        kvs: list[tuple[str, object, str]] = [(KV_QUANTIZE_FILE, _cut(given_path), "str")]
        if self.datasets:
            kvs.append((KV_QUANTIZE_DATASET, _cut(self.datasets[0]), "str"))
        kvs.append((KV_QUANTIZE_ENTRIES, len(self.weights) & 0xFFFFFFFF, "u32"))
        # quantize.cpp keeps the chunk count as int32 and writes it only when positive
        chunks = struct.unpack("<i", struct.pack("<I", self.chunk_count & 0xFFFFFFFF))[0]
        if chunks > 0:
            kvs.append((KV_QUANTIZE_CHUNKS, chunks, "u32"))
        return kvs


def _cut(s: str) -> str:
    raw = s.encode("utf-8")[:_KV_OVERRIDE_STR_BYTES]
    return raw.decode("utf-8", errors="ignore")


# --- reading ----------------------------------------------------------------------------------------

def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF or legacy imatrix file (told apart by the GGUF magic, as llama.cpp's loader tries
    GGUF first) and compute the per-tensor weights llama-quantize would use."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise GGMergeError("no such imatrix file", path=path) from None
    except IsADirectoryError:
        raise GGMergeError("is a folder, not an imatrix file", path=path) from None
    except OSError as exc:
        raise GGMergeError(f"cannot read: {exc.strerror or exc}", path=path) from None
    im = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    im.weights = {name: _weights(im, name, e) for name, e in im.entries.items()}
    return im


def _weights(im: Imatrix, name: str, e: ImatrixEntry) -> np.ndarray:
    """quantize.cpp ``load_imatrix``: float32 division per expert, 1 for an expert that saw nothing."""
    if im.is_legacy:
        ncall = int(e.counts[0])
        w = e.sums / np.float32(ncall) if ncall > 0 else e.sums.copy()
    else:
        n_mat = e.counts.size
        rows = e.sums.reshape(n_mat, -1)
        w = np.empty_like(rows)
        for j in range(n_mat):
            count = np.float32(e.counts[j])
            w[j] = rows[j] / count if count > 0 else np.float32(1)
        w = w.reshape(-1)
    w = w.astype(np.float32, copy=False)
    # llama_model_quantize_impl refuses the whole imatrix on one non-finite value
    if not np.isfinite(w).all():
        bad = float(w[~np.isfinite(w)][0])
        raise GGMergeError(f"imatrix holds a non-finite weight ({bad})", path=im.path, tensor=name)
    return w


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    from ..limits import check_gguf_header

    check_gguf_header(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError, struct.error) as exc:
        raise GGMergeError(f"cannot read as GGUF: {exc}", path=path) from None
    fields = reader.fields
    missing = [k for k in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE) if k not in fields]
    if missing:
        # quantize.cpp: "missing imatrix metadata" (a model GGUF passed by mistake lands here)
        gtype = fields["general.type"].contents() if "general.type" in fields else None
        raise GGMergeError(f"not an imatrix file: no {', '.join(missing)} metadata"
                           + (f" (general.type is '{gtype}')" if gtype else ""), path=path)
    VT = gguf.GGUFValueType
    ds = fields[KV_DATASETS]
    if ds.types[:2] != [VT.ARRAY, VT.STRING] and not (ds.types == [VT.ARRAY] and not ds.data):
        raise GGMergeError("must be an array of strings", path=path, key=KV_DATASETS)
    datasets = [str(s) for s in ds.contents()] if ds.data else []
    ints = {}
    for key in (KV_CHUNK_COUNT, KV_CHUNK_SIZE):
        fld = fields[key]
        if fld.types != [VT.UINT32]:
            raise GGMergeError("must be a uint32", path=path, key=key)
        ints[key] = int(fld.contents())

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = t.name
        if name.endswith(SUFFIX_SUMS):
            into, base = sums, name[: -len(SUFFIX_SUMS)]
        elif name.endswith(SUFFIX_COUNTS):
            into, base = counts, name[: -len(SUFFIX_COUNTS)]
        else:
            continue  # common_imatrix_load ignores other tensors
        if not base:
            continue
        if int(t.tensor_type) != int(gguf.GGMLQuantizationType.F32):
            raise GGMergeError(f"must be F32, not {t.tensor_type.name}", path=path, tensor=name)
        into[base] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if not reader.tensors:
        raise GGMergeError("no data in the imatrix file (it holds no tensors)", path=path)

    entries: dict[str, ImatrixEntry] = {}
    for base in sorted(sums.keys() | counts.keys()):
        if base not in sums or base not in counts:
            lacking = SUFFIX_COUNTS if base not in counts else SUFFIX_SUMS
            raise GGMergeError(f"has no matching '{base}{lacking}' tensor", path=path,
                               tensor=base + (SUFFIX_SUMS if lacking == SUFFIX_COUNTS else SUFFIX_COUNTS))
        s, c = sums[base], counts[base]
        if c.size == 0 or s.size % c.size:
            raise GGMergeError(f"{s.size} sums do not split into {c.size} expert(s)", path=path,
                               tensor=base + SUFFIX_SUMS)
        if not np.isfinite(c).all() or (c < 0).any():
            raise GGMergeError("counts must be finite and non-negative", path=path, tensor=base + SUFFIX_COUNTS)
        # common_imatrix_load: std::lround (half away from zero)
        ci = np.floor(c.astype(np.float64) + 0.5).astype(np.int64)
        entries[base] = ImatrixEntry(sums=s.copy(), counts=ci)
    return Imatrix(path=path, entries=entries, datasets=datasets, chunk_count=ints[KV_CHUNK_COUNT],
                   chunk_size=ints[KV_CHUNK_SIZE], is_legacy=False)


def _read_legacy(path: Path) -> Imatrix:
    """``common_imatrix_load_legacy``, with every length checked against the bytes left."""
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str, tensor: str | None = None) -> bytes:
        nonlocal pos
        if n > len(data) - pos:
            raise GGMergeError(f"truncated legacy imatrix: {what} needs {n} bytes at offset {pos}, "
                               f"only {len(data) - pos} left", path=path, tensor=tensor)
        out = data[pos:pos + n]
        pos += n
        return out

    def i32(what: str, tensor: str | None = None) -> int:
        return struct.unpack("<i", take(4, what, tensor))[0]

    if len(data) < 4:
        raise GGMergeError(f"not an imatrix file ({len(data)} bytes)", path=path)
    n_entries = i32("the entry count")
    if n_entries < 1 or n_entries > MAX_TENSORS:
        raise GGMergeError(f"not an imatrix file: neither GGUF nor a legacy .dat file claiming {n_entries} "
                           f"entries (expected 1 to {MAX_TENSORS})", path=path)
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        n = i32(f"the name length of entry #{i}")
        if n < 0 or n > MAX_KEY_BYTES:
            raise GGMergeError(f"entry #{i} claims a name of {n} bytes (limit {MAX_KEY_BYTES}): not a "
                               "legacy imatrix file, or a damaged one", path=path)
        raw = take(n, f"the name of entry #{i}")
        # the C reader stops the name at its first NUL byte
        try:
            name = raw.split(b"\0", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            raise GGMergeError(f"the name of entry #{i} is not UTF-8", path=path) from None
        ncall = i32("its call count", name)
        nval = i32("its value count", name)
        if nval < 1 or nval > MAX_IMATRIX_VALUES:
            raise GGMergeError(f"claims {nval} values (expected 1 to {MAX_IMATRIX_VALUES})", path=path,
                               tensor=name)
        if name in entries:
            raise GGMergeError("appears twice in the imatrix file", path=path, tensor=name)
        sums = np.frombuffer(take(4 * nval, f"{nval} values", name), dtype="<f4").astype(np.float32)
        entries[name] = ImatrixEntry(sums=sums, counts=np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if pos < len(data):  # the trailer (chunk count, dataset name) is optional
        chunk_count = i32("the chunk count")
        if pos < len(data):
            n = i32("the dataset name length")
            if n > MAX_STRING_BYTES:
                raise GGMergeError(f"dataset name claims {n} bytes (limit {MAX_STRING_BYTES})", path=path)
            if n > 0:
                raw = take(n, "the dataset name").split(b"\0", 1)[0]
                datasets.append(raw.decode("utf-8", errors="replace"))
    return Imatrix(path=path, entries=entries, datasets=datasets, chunk_count=chunk_count, chunk_size=0,
                   is_legacy=True)


# --- writing ----------------------------------------------------------------------------------------

def _gguf_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def write_imatrix(path: str | os.PathLike, entries: dict[str, tuple[np.ndarray, np.ndarray | int]], *,
                  datasets: list[str], chunk_count: int, chunk_size: int) -> Path:
    """Write an imatrix in llama.cpp's GGUF format, byte for byte as ``save_imatrix`` in
    ``tools/imatrix/imatrix.cpp`` would (so llama-quantize and llama-imatrix read it).

    ``entries`` maps a GGUF weight name to (sums, counts): ``sums`` the float32 sum of squared
    activations per input column — 1-D for one matrix, ``(n_experts, n_cols)`` (or flat,
    expert-major) for stacked experts; ``counts`` the activation rows summed, an int for one matrix
    or one per expert. ``datasets`` are the calibration file names, ``chunk_count`` the chunks
    processed and ``chunk_size`` the tokens per chunk. Written atomically; returns the path.
    """
    path = Path(path)
    prepared = []
    for name in sorted(entries):  # save_imatrix sorts the names (byte order = code-point order)
        sums, counts = entries[name]
        sums = np.asarray(sums, dtype=np.float32)
        c = np.atleast_1d(np.asarray(counts)).reshape(-1)
        n_mat = c.size
        if sums.ndim == 2 and sums.shape[0] != n_mat:
            raise GGMergeError(f"sums have {sums.shape[0]} expert rows but {n_mat} counts", path=path, tensor=name)
        flat = np.ascontiguousarray(sums.reshape(-1))
        if n_mat == 0 or flat.size == 0 or flat.size % n_mat:
            raise GGMergeError(f"{flat.size} sums do not split into {n_mat} expert(s)", path=path, tensor=name)
        if (c < 0).any():
            raise GGMergeError("counts must be non-negative", path=path, tensor=name)
        if len((name + SUFFIX_SUMS).encode()) >= GGML_MAX_NAME:
            raise GGMergeError(f"name too long for an imatrix tensor name (ggml allows {GGML_MAX_NAME - 1} "
                               "bytes with the '.in_sum2' suffix)", path=path, tensor=name)
        prepared.append((name, flat, c.astype(np.float32), n_mat))

    VT_STR, VT_ARR, VT_U32 = 8, 9, 4
    kv = [_gguf_str("general.type") + struct.pack("<I", VT_STR) + _gguf_str("imatrix"),
          _gguf_str(KV_DATASETS) + struct.pack("<IIQ", VT_ARR, VT_STR, len(datasets))
          + b"".join(_gguf_str(d) for d in datasets),
          _gguf_str(KV_CHUNK_COUNT) + struct.pack("<II", VT_U32, int(chunk_count) & 0xFFFFFFFF),
          _gguf_str(KV_CHUNK_SIZE) + struct.pack("<II", VT_U32, int(chunk_size) & 0xFFFFFFFF)]
    infos, blobs, offset = [], [], 0

    def add(tname: str, ne: tuple[int, int], arr: np.ndarray) -> None:
        nonlocal offset
        # gguf_write_out stores ggml_n_dims dimensions: trailing 1s are dropped (at least one kept)
        dims = list(ne)
        while len(dims) > 1 and dims[-1] == 1:
            dims.pop()
        infos.append(_gguf_str(tname) + struct.pack("<I", len(dims))
                     + struct.pack(f"<{len(dims)}q", *dims) + struct.pack("<IQ", 0, offset))
        raw = arr.astype("<f4").tobytes()
        blobs.append(raw + bytes(-len(raw) % _ALIGN))
        offset += len(blobs[-1])

    for name, flat, c, n_mat in prepared:
        add(name + SUFFIX_SUMS, (flat.size // n_mat, n_mat), flat)
        add(name + SUFFIX_COUNTS, (1, n_mat), c)

    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    head += bytes(-len(head) % _ALIGN)
    with atomic_path(path) as tmp:  # OSErrors (full disk...) become one GGMergeError there
        with open(tmp, "wb") as f:
            f.write(head)
            for b in blobs:
                f.write(b)
    return path

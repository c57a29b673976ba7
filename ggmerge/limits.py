"""Bounds on what an input file may claim, and header checks that apply them before anything is allocated.

Model files come from strangers. A GGUF or safetensors header is a list of lengths and counts, and a
reader that believes them can be made to loop for hours or allocate terabytes from a 100-byte file.
Every length and count is checked here against two things: the bytes actually left in the file (a
claim the file cannot back is a lie or a truncation) and a fixed maximum a real model never reaches
(so a huge-but-present file still cannot make us build millions of Python objects).

``check_gguf_header`` walks the whole GGUF header (magic, version, counts, every KV and tensor info)
with those bounds — the checks ``gguf_init_from_file_impl`` in llama.cpp's ggml/src/gguf.cpp makes,
plus the file-size ones gguf-py's ``GGUFReader`` lacks (it loops ``count`` times reading past the end
of its memory map without noticing). ``check_safetensors_header`` does the same for safetensors
(the layout rules of safetensors' ``Metadata::validate``). Both raise :class:`GGMergeError` naming the
file and the key or tensor, and are cheap: they read the header only, never tensor data.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GGMergeError

# --- bounds -----------------------------------------------------------------------------------------

#: tensors in one file. The largest real checkpoints hold ~10^5 (DeepSeek-V3's HF shards: ~91k);
#: each tensor costs a reader several Python objects, so a million is generous and still bounded.
MAX_TENSORS = 1 << 20
#: GGUF metadata pairs. Real files hold 20–60; gguf-py builds a few objects per pair.
MAX_KV = 1 << 16
#: bytes of one GGUF string. The longest real ones are chat templates and embedded tokenizer JSON
#: (kB to a few MB); every string is decoded into a Python str, so cap well below llama.cpp's 1 GiB.
MAX_STRING_BYTES = 64 << 20
#: bytes of a GGUF metadata key (real keys are ~10–60 characters)
MAX_KEY_BYTES = 1 << 12
#: elements of one GGUF array. The largest real ones are token lists and BPE merges (262,144 tokens
#: in Gemma 3; ~500k merges); gguf-py makes one numpy view per element, so bound it at 2^22.
MAX_ARRAY_ITEMS = 1 << 22
#: GGUF tensor names: llama.cpp refuses names of GGML_MAX_NAME (64) bytes or more (ggml.h)
GGML_MAX_NAME = 64
#: GGUF tensor rank: GGML_MAX_DIMS in ggml.h
GGML_MAX_DIMS = 4
#: safetensors tensor rank: the format has no limit; real weights have ≤ 5 (conv3d)
MAX_SAFETENSORS_DIMS = 16
#: safetensors header bytes: safetensors itself refuses headers above 100 MB (MAX_HEADER_SIZE)
MAX_SAFETENSORS_HEADER = 100_000_000
#: GGUF versions gguf-py and llama.cpp read (v1 had 32-bit counts and is gone from both)
GGUF_VERSIONS = (2, 3)
GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
#: elements of one tensor: ggml and numpy index with int64
MAX_ELEMENTS = (1 << 63) - 1

#: bits per element of every safetensors dtype (the format's list, sub-byte float types included)
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

# GGUF metadata value types (gguf_type in gguf.h): fixed sizes; 8 = string, 9 = array
_GGUF_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def _ggml_types() -> dict[int, tuple[int, int]]:
    """ggml type id → (block size, bytes per block), from gguf-py's table (what GGUFReader can map)."""
    import gguf

    return {int(t): v for t, v in gguf.GGML_QUANT_SIZES.items()}


# --- GGUF -------------------------------------------------------------------------------------------

@dataclass
class GGUFTensorInfo:
    name: str
    ne: tuple[int, ...]        # ggml order: ne[0] is the row length
    ggml_type: int
    offset: int                # relative to the data section
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    byte_order: str            # '<' or '>'
    alignment: int
    data_offset: int           # absolute offset of the data section
    keys: list[str] = field(default_factory=list)
    tensors: list[GGUFTensorInfo] = field(default_factory=list)


class _Cursor:
    """Bounds-checked reads from a byte buffer; every failure names the file and what was being read."""

    def __init__(self, buf, path: Path, order: str = "<"):
        self.buf, self.path, self.order, self.pos = buf, path, order, 0
        self.size = len(buf)

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str, **where) -> None:
        if n > self.remaining():
            raise GGMergeError(f"truncated GGUF header: {what} needs {n} bytes at offset {self.pos}, "
                               f"only {self.remaining()} left in the file", path=self.path, **where)

    def unpack(self, fmt: str, what: str, **where):
        n = struct.calcsize(fmt)
        self.need(n, what, **where)
        vals = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return vals[0] if len(vals) == 1 else vals

    def string(self, what: str, limit: int, **where) -> str:
        n = self.unpack("Q", f"the length of {what}", **where)
        if n > limit:
            raise GGMergeError(f"{what} claims a length of {n} bytes (limit {limit})", path=self.path, **where)
        self.need(n, what, **where)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGMergeError(f"{what} is not valid UTF-8", path=self.path, **where) from None


def _skip_value(c: _Cursor, vtype: int, key: str) -> object:
    """Step over one KV value, bounding every length; returns the value for the keys we need."""
    if vtype in _GGUF_SCALAR_SIZE:
        n = _GGUF_SCALAR_SIZE[vtype]
        c.need(n, "a metadata value", key=key)
        fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}[vtype]
        return c.unpack(fmt, "a metadata value", key=key)
    if vtype == _STRING:
        return c.string("a metadata string", MAX_STRING_BYTES, key=key)
    if vtype == _ARRAY:
        sub = c.unpack("I", "an array item type", key=key)
        count = c.unpack("Q", "an array length", key=key)
        if count > MAX_ARRAY_ITEMS:
            raise GGMergeError(f"array claims {count} items (limit {MAX_ARRAY_ITEMS})", path=c.path, key=key)
        if sub == _ARRAY:
            # llama.cpp refuses nested arrays too (gguf_init_from_file_impl: "invalid GGUF type")
            raise GGMergeError("nested metadata arrays are not supported", path=c.path, key=key)
        if sub in _GGUF_SCALAR_SIZE:
            c.need(count * _GGUF_SCALAR_SIZE[sub], f"an array of {count} items", key=key)
            c.pos += count * _GGUF_SCALAR_SIZE[sub]
            return None
        if sub == _STRING:
            c.need(count * 8, f"an array of {count} strings", key=key)  # each has an 8-byte length
            for i in range(count):
                c.string(f"string #{i} of the array", MAX_STRING_BYTES, key=key)
            return None
        raise GGMergeError(f"array of unknown metadata type {sub}", path=c.path, key=key)
    raise GGMergeError(f"unknown metadata value type {vtype}", path=c.path, key=key)


def check_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Walk a GGUF file's header with every length and count bounded; raise GGMergeError if it lies.

    Checks: magic, version (2 or 3, either byte order), tensor and KV counts (against the limits and
    against the bytes left), every key (non-empty, unique, UTF-8), every value (known type, strings and
    arrays within the file and the limits, no nested arrays), ``general.alignment`` (a power of two,
    stored as uint32), every tensor info (name < 64 bytes and unique, rank ≤ 4, no negative or
    overflowing dimensions, a ggml type gguf-py knows, a row length that is a whole number of blocks, an
    aligned offset) and that every tensor's bytes lie inside the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGMergeError("not a GGUF file (the file is empty)", path=path)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk_gguf(buf, path)
    except FileNotFoundError:
        raise GGMergeError("no such file", path=path) from None
    except IsADirectoryError:
        raise GGMergeError("is a folder, not a GGUF file", path=path) from None
    except (OSError, ValueError) as exc:
        raise GGMergeError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", path=path) from None


def _walk_gguf(buf, path: Path) -> GGUFHeader:
    c = _Cursor(buf, path)
    c.need(4, "the magic")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise GGMergeError(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})", path=path)
    c.pos = 4
    version = c.unpack("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order (gguf-py reads those)
        c.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in GGUF_VERSIONS:
        raise GGMergeError(f"unsupported GGUF version {version} (readable: "
                           f"{', '.join(map(str, GGUF_VERSIONS))})", path=path)
    n_tensors = c.unpack("Q", "the tensor count")
    n_kv = c.unpack("Q", "the metadata count")
    # each tensor info takes at least 8+1+4+8+4+8 bytes, each KV at least 8+1+4+1
    for count, limit, least, what, key in ((n_tensors, MAX_TENSORS, 33, "tensors", "GGUF.tensor_count"),
                                           (n_kv, MAX_KV, 14, "metadata pairs", "GGUF.kv_count")):
        if count > limit:
            raise GGMergeError(f"header claims {count} {what} (limit {limit})", path=path, key=key)
        if count * least > c.remaining():
            raise GGMergeError(f"header claims {count} {what}, more than a {c.size}-byte file can hold: "
                               "truncated, or its header lies", path=path, key=key)
    hdr = GGUFHeader(version=version, byte_order=c.order, alignment=GGUF_DEFAULT_ALIGNMENT, data_offset=0)
    seen: set[str] = set()
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", MAX_KEY_BYTES)
        if not key:
            raise GGMergeError(f"metadata key #{i} is empty", path=path)
        if key in seen:
            raise GGMergeError("metadata key appears twice", path=path, key=key)
        seen.add(key)
        vtype = c.unpack("I", "a metadata type", key=key)
        value = _skip_value(c, vtype, key)
        if key == "general.alignment":
            if vtype != _UINT32:
                raise GGMergeError("must be a uint32", path=path, key=key)
            if value == 0 or value & (value - 1):
                raise GGMergeError(f"alignment {value} is not a power of two", path=path, key=key)
            hdr.alignment = value
        hdr.keys.append(key)

    types = _ggml_types()
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"the name of tensor #{i}", GGML_MAX_NAME - 1)
        if name in names:
            raise GGMergeError("tensor appears twice", path=path, tensor=name)
        names.add(name)
        n_dims = c.unpack("I", "a tensor rank", tensor=name)
        if n_dims > GGML_MAX_DIMS:
            raise GGMergeError(f"tensor has {n_dims} dimensions (ggml allows {GGML_MAX_DIMS})",
                               path=path, tensor=name)
        ne = tuple(c.unpack("q", "a tensor dimension", tensor=name) for _ in range(n_dims))
        n = 1
        for d in ne:
            if d < 0:
                raise GGMergeError(f"tensor has a negative dimension {list(ne)}", path=path, tensor=name)
            n *= d
        if n > MAX_ELEMENTS:
            raise GGMergeError(f"tensor shape {list(ne)} overflows 64-bit element counts", path=path,
                               tensor=name)
        gtype = c.unpack("I", "a tensor type", tensor=name)
        if gtype not in types:
            raise GGMergeError(f"unknown GGML type {gtype}", path=path, tensor=name)
        block, type_size = types[gtype]
        row = ne[0] if ne else 1
        if row % block:
            raise GGMergeError(f"row length {row} is not a multiple of the block size {block} of GGML type "
                               f"{gtype}", path=path, tensor=name)
        offset = c.unpack("Q", "a tensor offset", tensor=name)
        if offset % hdr.alignment:
            raise GGMergeError(f"data offset {offset} is not a multiple of the alignment {hdr.alignment}",
                               path=path, tensor=name)
        hdr.tensors.append(GGUFTensorInfo(name, ne, gtype, offset, n // block * type_size))

    pad = -c.pos % hdr.alignment
    hdr.data_offset = c.pos + pad
    if n_tensors and hdr.data_offset > c.size:
        raise GGMergeError("file ends before its tensor data begins (truncated)", path=path)
    for t in hdr.tensors:
        begin = hdr.data_offset + t.offset
        end = begin + t.nbytes
        if end > c.size:
            raise GGMergeError(f"tensor data [{begin}, {end}) lies beyond the end of the file ({c.size} bytes): "
                               "the file is truncated or its header lies", path=path, tensor=t.name)
    return hdr


# --- safetensors ------------------------------------------------------------------------------------

class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    """JSON objects without repeated keys: ``json`` keeps the last silently, so a tensor listed twice
    would be read from whichever entry came last."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def check_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, checked like safetensors' ``Metadata::validate``.

    The 8-byte length must fit the file and :data:`MAX_SAFETENSORS_HEADER`; the header must be a JSON
    object without duplicate keys; ``__metadata__`` (optional) maps strings to strings; every tensor
    has a known dtype, a shape of non-negative integers, and ``data_offsets`` whose span is exactly
    shape × dtype size; the spans tile the data section from 0 to its end with no gap or overlap.
    Returns the header (``__metadata__`` included), as ``json.loads`` gives it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise GGMergeError(f"not a safetensors file ({size} bytes, shorter than the 8-byte header "
                                   "length)", path=path)
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise GGMergeError(f"not a valid safetensors file (header length {n} does not fit in "
                                   f"{size} bytes, limit {MAX_SAFETENSORS_HEADER}): truncated or not "
                                   "safetensors", path=path)
            raw = f.read(n)
    except FileNotFoundError:
        raise GGMergeError("no such file", path=path) from None
    except IsADirectoryError:
        raise GGMergeError("is a folder, not a safetensors file", path=path) from None
    except OSError as exc:
        raise GGMergeError(f"cannot read: {exc.strerror or exc}", path=path) from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        raise GGMergeError("listed twice in the header", path=path, tensor=str(exc)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise GGMergeError(f"not a valid safetensors file (header is not JSON: {exc})", path=path) from None
    if not isinstance(header, dict):
        raise GGMergeError("not a valid safetensors file (header is not a JSON object)", path=path)
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise GGMergeError("__metadata__ must map strings to strings", path=path, key="__metadata__")
    if len(header) > MAX_TENSORS:
        raise GGMergeError(f"header lists {len(header)} tensors (limit {MAX_TENSORS})", path=path)
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not name:
            raise GGMergeError("a tensor has an empty name", path=path)
        spans.append((*_check_entry(name, info, data_len, path), name))
    spans.sort()
    at = 0
    for begin, end, name in spans:
        if begin != at:
            what = "overlaps the previous tensor" if begin < at else f"leaves a gap of {begin - at} bytes"
            raise GGMergeError(f"tensor data at [{begin}, {end}) {what} (expected to start at {at})",
                               path=path, tensor=name)
        at = end
    if at != data_len:
        raise GGMergeError(f"tensor data covers {at} bytes but the file holds {data_len} after the header: "
                           "truncated, or extra bytes", path=path)
    return header


def _check_entry(name: str, info, data_len: int, path: Path) -> tuple[int, int]:
    def bad(msg):
        return GGMergeError(msg, path=path, tensor=name)

    if not isinstance(info, dict):
        raise bad("header entry is not an object")
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise bad(f"unknown dtype {str(dtype)[:40]!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_SAFETENSORS_DIMS
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"shape must be a list of at most {MAX_SAFETENSORS_DIMS} non-negative integers, got "
                  f"{str(shape)[:80]}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(x) is int for x in offs)):
        raise bad(f"data_offsets must be [begin, end], got {str(offs)[:80]}")
    begin, end = offs
    if not 0 <= begin <= end:
        raise bad(f"data_offsets [{begin}, {end}) are not an increasing pair")
    if end > data_len:
        raise bad(f"tensor data [{begin}, {end}) lies beyond the end of the file ({data_len} data bytes): "
                  "the file is truncated or its header lies")
    count = 1
    for d in shape:
        count *= d
    bits = count * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise bad(f"{dtype} {shape} needs {bits / 8:g} bytes but data_offsets span {end - begin}: "
                  "the header's dtype or shape does not match the data")
    return begin, end

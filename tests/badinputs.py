"""Builders for hostile and broken input files: GGUF and safetensors assembled byte by byte.

The GGUF and safetensors writers in gguf-py and safetensors refuse to write a lying header, so these
build files by hand (``struct.pack`` and JSON), following the formats' specifications: GGUF (magic,
version, tensor count, KV count, KV pairs, tensor infos, padding, data — ggml/docs/gguf.md) and
safetensors (8-byte little-endian header length, JSON header, data). Each builder also records where
its length and count fields are, so the fuzzer can inflate exactly those.

A valid file built here is checked against the real readers (gguf-py's ``GGUFReader`` and llama.cpp
through llama-cpp-python for GGUF, ``safetensors.safe_open``) in test_fuzz_headers.py, so a lie in a
mutated file is a lie about a file the reference tools accept.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# GGUF value types (gguf.h: enum gguf_type)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q",
        I64: "q", F64: "d"}
# ggml tensor types used here
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8


@dataclass
class Field:
    """Where a length or count sits in the built bytes (for targeted mutation)."""
    offset: int
    size: int          # 4 or 8 bytes
    label: str


@dataclass
class GGUFBuild:
    """A GGUF file described as KV pairs and tensors; ``to_bytes`` lays it out.

    Overrides (``magic``, ``version``, ``n_tensors``, ``n_kv``) let a test write a header that lies.
    Tensors are given in ggml order: ``ne[0]`` is the row length, as GGUF stores it.
    """
    magic: bytes = b"GGUF"
    version: int = 3
    alignment: int = 32
    n_tensors: int | None = None
    n_kv: int | None = None
    kvs: list = field(default_factory=list)       # (key, vtype, value, subtype)
    tensors: list = field(default_factory=list)   # (name, ne, ggml_type, data bytes, offset or None)

    def kv(self, key: str, vtype: int, value, sub: int | None = None) -> GGUFBuild:
        self.kvs.append((key, vtype, value, sub))
        return self

    def tensor(self, name: str, data: np.ndarray | bytes, ggml_type: int = GGML_F32,
               ne: tuple[int, ...] | None = None, offset: int | None = None) -> GGUFBuild:
        """Add a tensor; for a numpy array ``ne`` defaults to its shape reversed (ggml order)."""
        if isinstance(data, np.ndarray):
            if ne is None:
                ne = tuple(reversed(data.shape))
            data = np.ascontiguousarray(data).tobytes()
        self.tensors.append((name, tuple(ne), ggml_type, bytes(data), offset))
        return self

    def to_bytes(self) -> tuple[bytes, list[Field]]:
        out = bytearray()
        fields: list[Field] = []

        def put(fmt: str, value, label: str | None = None):
            if label is not None:
                fields.append(Field(len(out), struct.calcsize(fmt), label))
            out.extend(struct.pack("<" + fmt, value))

        def put_str(s: str | bytes, label: str):
            raw = s.encode("utf-8") if isinstance(s, str) else s
            put("Q", len(raw), f"strlen {label}")
            out.extend(raw)

        out.extend(self.magic)
        put("I", self.version, "version")
        put("Q", len(self.tensors) if self.n_tensors is None else self.n_tensors, "n_tensors")
        put("Q", len(self.kvs) if self.n_kv is None else self.n_kv, "n_kv")
        for key, vtype, value, sub in self.kvs:
            put_str(key, f"key {key}")
            put("I", vtype, f"type {key}")
            if vtype == STR:
                put_str(value, f"value {key}")
            elif vtype == ARR:
                put("I", sub, f"subtype {key}")
                put("Q", len(value), f"count {key}")
                for item in value:
                    if sub == STR:
                        put_str(item, f"item of {key}")
                    else:
                        put(_FMT[sub], item)
            else:
                put(_FMT[vtype], value)
        # tensor data offsets: consecutive, each padded to the alignment (as gguf-py and llama.cpp write)
        offsets, at = [], 0
        for _name, _ne, _t, data, offset in self.tensors:
            offsets.append(at if offset is None else offset)
            at += len(data) + (-len(data) % self.alignment)
        for (name, ne, gtype, _data, _o), off in zip(self.tensors, offsets):
            put_str(name, f"tensor {name}")
            put("I", len(ne), f"n_dims {name}")
            for k, d in enumerate(ne):
                put("Q", d, f"ne{k} {name}")
            put("I", gtype, f"ggml_type {name}")
            put("Q", off, f"offset {name}")
        out.extend(b"\0" * (-len(out) % self.alignment))
        for _name, _ne, _t, data, _o in self.tensors:
            out.extend(data)
            out.extend(b"\0" * (-len(data) % self.alignment))
        return bytes(out), fields

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes()[0])
        return path


#: a tiny SentencePiece-style vocabulary: control tokens, then letters and word pieces
def tiny_vocab(n: int, byte_tokens: bool = False) -> tuple[list[str], list[float], list[int]]:
    """``byte_tokens`` adds the 256 ``<0xNN>`` pieces llama.cpp's SPM tokenizer needs to tokenize."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["▁"] + ["▁" + c for c in letters] + letters + ["▁" + a + b for a in letters for b in letters]
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]
    if byte_tokens:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [6] * 256
    k = len(tokens)
    tokens += pieces[: n - k]
    types += [1] * (n - k)
    assert len(tokens) == n
    scores = [0.0] * k + [-float(i) for i in range(n - k)]
    return tokens, scores, types


def tiny_llama_gguf(*, n_vocab: int = 32, n_embd: int = 32, n_ff: int = 64, n_layer: int = 1,
                    n_head: int = 4, n_head_kv: int = 2, seed: int = 0, arch: str = "llama",
                    quant_first: bool = False, byte_tokens: bool = False,
                    chat_template: str | None = None) -> GGUFBuild:
    """A complete llama-architecture GGUF (F32 weights, SPM vocab) small enough to mutate 10,000 times.

    ``quant_first`` stores the first tensor (token_embd) as Q8_0 so mutated files exercise a codec.
    """
    rng = np.random.default_rng(seed)
    b = GGUFBuild()
    tokens, scores, types = tiny_vocab(n_vocab, byte_tokens)
    b.kv("general.architecture", STR, arch)
    b.kv("general.name", STR, "ggmerge-hostile")
    b.kv(f"{arch}.context_length", U32, 128)
    b.kv(f"{arch}.embedding_length", U32, n_embd)
    b.kv(f"{arch}.block_count", U32, n_layer)
    b.kv(f"{arch}.feed_forward_length", U32, n_ff)
    b.kv(f"{arch}.attention.head_count", U32, n_head)
    b.kv(f"{arch}.attention.head_count_kv", U32, n_head_kv)
    b.kv(f"{arch}.rope.dimension_count", U32, n_embd // n_head)
    b.kv(f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-5)
    b.kv(f"{arch}.rope.freq_base", F32, 10000.0)
    b.kv("general.file_type", U32, 0)
    b.kv("tokenizer.ggml.model", STR, "llama")
    b.kv("tokenizer.ggml.tokens", ARR, tokens, STR)
    b.kv("tokenizer.ggml.scores", ARR, scores, F32)
    b.kv("tokenizer.ggml.token_type", ARR, types, I32)
    b.kv("tokenizer.ggml.bos_token_id", U32, 1)
    b.kv("tokenizer.ggml.eos_token_id", U32, 2)
    b.kv("tokenizer.ggml.unknown_token_id", U32, 0)
    b.kv("general.quantization_version", U32, 2)
    if chat_template is not None:
        b.kv("tokenizer.chat_template", STR, chat_template)

    def w(*shape):  # numpy order (rows, cols)
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    emb = w(n_vocab, n_embd)
    if quant_first:
        import gguf

        raw = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
        b.tensor("token_embd.weight", raw.tobytes(), GGML_Q8_0, ne=(n_embd, n_vocab))
    else:
        b.tensor("token_embd.weight", emb)
    b.tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32))
    b.tensor("output.weight", w(n_vocab, n_embd))
    hd = n_embd // n_head
    for i in range(n_layer):
        p = f"blk.{i}."
        b.tensor(p + "attn_norm.weight", np.ones(n_embd, np.float32))
        b.tensor(p + "attn_q.weight", w(n_head * hd, n_embd))
        b.tensor(p + "attn_k.weight", w(n_head_kv * hd, n_embd))
        b.tensor(p + "attn_v.weight", w(n_head_kv * hd, n_embd))
        b.tensor(p + "attn_output.weight", w(n_embd, n_head * hd))
        b.tensor(p + "ffn_norm.weight", np.ones(n_embd, np.float32))
        b.tensor(p + "ffn_gate.weight", w(n_ff, n_embd))
        b.tensor(p + "ffn_up.weight", w(n_ff, n_embd))
        b.tensor(p + "ffn_down.weight", w(n_embd, n_ff))
    return b


# --- safetensors --------------------------------------------------------------------------------------

def safetensors_bytes(header: dict | bytes, data: bytes, *, length: int | None = None) -> bytes:
    """8-byte length + header + data; ``header`` may be raw bytes (for non-JSON headers) and ``length``
    may lie about the header's size."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def tiny_safetensors(n: int = 3, *, seed: int = 0) -> tuple[dict, bytes]:
    """A small valid header + data: F32, BF16 and F16 tensors of a few shapes, with metadata."""
    import torch

    rng = np.random.default_rng(seed)
    header: dict = {"__metadata__": {"format": "pt"}}
    data = bytearray()
    specs = [("model.embed_tokens.weight", "F32", [8, 4]), ("model.norm.weight", "BF16", [4]),
             ("lm_head.weight", "F16", [8, 4]), ("model.layers.0.mlp.up_proj.weight", "F32", [6, 4])][:n]
    for name, dtype, shape in specs:
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        x = x.to({"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype])
        raw = x.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data.extend(raw)
    return header, bytes(data)


def read_safetensors(path: str | Path) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file."""
    b = Path(path).read_bytes()
    n = struct.unpack_from("<Q", b)[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def rewrite_safetensors(path: str | Path, edit, *, data: bytes | None = None) -> Path:
    """Apply ``edit(header)`` (in place) to a safetensors file's header and write it back."""
    header, old = read_safetensors(path)
    edit(header)
    Path(path).write_bytes(safetensors_bytes(header, old if data is None else data))
    return Path(path)


# --- recipes ------------------------------------------------------------------------------------------

def write_recipe(folder: str | Path, text: str, name: str = "ggmerge.yaml") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return p

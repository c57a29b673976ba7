"""The GGUF files a build writes from its own pass: every merged tensor goes to the HF writer and to each
GGUF file at once, so no output is read back to make another.

Each file is exactly what ``ggmerge quantize TYPE out/<name>/`` makes from the finished HF folder: the
same plan (:func:`ggmerge.quantize.plan_source` over a source that serves the merged tensors as the HF
files hold them, a tokenizer folder written by the same ``write_hf``, the same config), the same
per-tensor types, the same codecs. Only the order of writing differs: tensors come in the build's order
and land at their place in llama.cpp's order (:class:`ggmerge.convert.gguf_out.GGUFFile`).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from .arch import family_for
from .convert.gguf_out import GGUFFile, OutTensor, _encode
from .convert.quants.ftypes import FileType, parse_ftype
from .errors import GGMergeError

log = logging.getLogger(__name__)


def parse_types(spec) -> list[FileType]:
    """``"q4_k_m,q6_k"`` or a list of names → file types, in the order given, without repeats."""
    if spec is None:
        return []
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[FileType] = []
    for n in names:
        if isinstance(n, FileType):
            ft = n
        elif str(n).strip():
            ft = parse_ftype(str(n).strip())
        else:
            continue
        if ft not in out:
            out.append(ft)
    return out


class _Merged:
    """A tensor source over the build's output tensors as they are produced (what the HF folder will
    hold: the values rounded to its dtype), the config it will hold and its tokenizer files."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], config: dict, tokenizer_dir: Path, where: Path):
        self.path = where
        self._shapes = shapes
        self._config = config
        self._tokenizer_dir = tokenizer_dir
        self._current: dict[str, torch.Tensor] = {}  # tensors being encoded, one per worker
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def config(self) -> dict:
        return dict(self._config)

    def tokenizer_dir(self) -> Path:
        return self._tokenizer_dir

    def load(self, name: str) -> torch.Tensor:
        return self._current[name].float()

    def serving(self, name: str, t: torch.Tensor | None) -> None:
        with self._lock:
            if t is None:
                self._current.pop(name, None)
            else:
                self._current[name] = t

    def close(self) -> None:
        pass


class GGUFOutputs:
    """One GGUF file per asked type, fed by the build pass; see the module docstring."""

    def __init__(self, types: list[FileType], hf_folder: Path, shapes: dict[str, tuple[int, ...]],
                 config: dict, vocab, *, imatrix=None, imatrix_arg: str | None = None) -> None:
        from .quantize import plan_source, quantized_path
        from .tokenizer.hf_files import write_hf

        self.types = types
        self.hf_folder = Path(hf_folder)
        self._scratch = Path(tempfile.mkdtemp(prefix="ggmerge-tokenizer-"))
        self.files: list[GGUFFile] = []
        # per output tensor (HF name): [(file, its OutTensor)], and whether it is stored row for row
        self._by_hf: dict[str, list[tuple[GGUFFile, OutTensor]]] = {}
        try:
            if vocab is None:
                raise GGMergeError("the merged model has no tokenizer; a GGUF needs one", path=self.hf_folder)
            write_hf(vocab, self._scratch)
            self.source = _Merged(shapes, config, self._scratch, self.hf_folder)
            self.family = family_for(config, path=self.hf_folder)
            gguf_of = {self.family.hf_to_gguf(n): n for n in shapes}
            for ft in types:
                arch, metadata, tensors = plan_source(self.source, self.hf_folder, ft, imatrix=imatrix,
                                                      imatrix_arg=imatrix_arg)
                f = GGUFFile(quantized_path(self.hf_folder, ft), arch, metadata, tensors)
                self.files.append(f)
                for t in tensors:
                    hf = gguf_of.get(t.name)
                    if hf is None:  # derived from the config (rope_freqs): written now
                        f.put(t.name, _encode(t, f.path))
                    else:
                        self._by_hf.setdefault(hf, []).append((f, t))
        except BaseException:
            self.abort()
            raise

    # -- tensors --------------------------------------------------------------------------------
    def encode(self, name: str, t: torch.Tensor) -> list[tuple[GGUFFile, str, np.ndarray]]:
        """Encoded bytes of output tensor ``name`` for every file (run in a worker: the codecs release
        the GIL)."""
        self.source.serving(name, t)
        try:
            return [(f, ot.name, _encode(ot, f.path)) for f, ot in self._by_hf.get(name, [])]
        finally:
            self.source.serving(name, None)

    def write(self, encoded: list[tuple[GGUFFile, str, np.ndarray]]) -> None:
        for f, gname, data in encoded:
            f.put(gname, data)

    def rows_streamable(self, name: str) -> bool:
        """Whether ``name`` can go out a block of rows at a time: stored unpermuted, row for row."""
        permuted = self.family.transformed(name)
        # per-expert importance weights follow the expert index, not a block of rows
        experts = any(ot.imatrix is not None and ot.imatrix.ndim == 2 and ot.imatrix.shape[0] > 1
                      for _, ot in self._by_hf.get(name, []))
        return not permuted and not experts and all(tuple(ot.shape) == self.source.shape(name)
                                                    for _, ot in self._by_hf.get(name, []))

    def put_rows(self, name: str, r0: int, rows: torch.Tensor, last: bool) -> None:
        """Rows ``r0…`` of a streamed output tensor, encoded per file (rows are quantized independently)."""
        for f, ot in self._by_hf.get(name, []):
            part = OutTensor(ot.name, tuple(rows.shape), ot.qtype, load=lambda: rows.float().numpy(),
                             imatrix=ot.imatrix)
            f.put_rows(ot.name, r0, _encode(part, f.path), last)

    # -- the files ------------------------------------------------------------------------------
    def finish(self) -> dict[str, str]:
        """Move every file into place; {file name: SHA-256}."""
        from .fingerprint import sha256_file

        out = {}
        try:
            for f in self.files:
                path = f.finish()
                out[path.name] = sha256_file(path, cache={})
        finally:
            self.abort()
        return out

    def abort(self) -> None:
        for f in self.files:
            f.abort()
        shutil.rmtree(self._scratch, ignore_errors=True)

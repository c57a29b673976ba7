"""``ggmerge quantize TYPE [INPUT] [-o OUT]``: a llama.cpp GGUF of file type TYPE, as llama-quantize makes it.

INPUT is a BF16/F16/F32 GGUF, an HF model folder (converted on the fly, no intermediate file), or an
already-quantized GGUF (allowed, with a warning: like ``llama-quantize --allow-requantize``). Without
INPUT the latest ``ggmerge build`` output of the recipe in the current directory is used.

Mirrors ``llama_model_quantize_impl`` (src/llama-quant.cpp): every KV pair is copied in order except
``general.quantization_version`` and ``general.file_type``, which are removed and re-appended (llama.cpp's
``gguf_set_val_u32`` does exactly that); tensors are written in llama.cpp's order (by block, then name);
a tensor whose chosen type equals its stored type is copied byte for byte; every other one is decoded
to float32 (what llama.cpp does with 16-bit input) and encoded by our codecs. The per-tensor types come
from :mod:`ggmerge.convert.quants.policy`; each fallback is logged as a warning.

``imatrix=FILE`` is ``llama-quantize --imatrix FILE``: a llama.cpp imatrix file (GGUF or legacy .dat,
:mod:`ggmerge.imatrix.files`) whose per-column weights go to the quantizers of every re-encoded tensor
that has an entry; the mixture rules see ``has_imatrix``; the output gets the ``quantize.imatrix.*``
keys llama-quantize appends (the path recorded as given). A type that needs an imatrix (Q2_K_S) is
refused without one.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from .errors import GGMergeError
from .convert.quants.ftypes import FileType, parse_ftype
from .arch import family_for, quant_hparams_from_kv
from .convert.quants.policy import Choice, check_imatrix_given, choose_types, llama_order

log = logging.getLogger(__name__)

QType = gguf.GGMLQuantizationType
_FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)

#: KV keys never copied from the input: the GGUF header pseudo-fields, the architecture (the writer
#: puts it first), split bookkeeping (llama.cpp removes it), and the two keys set for the new file
_SKIP_KEYS = ("general.architecture", "general.quantization_version", "general.file_type",
              "split.no", "split.count", "split.tensors.count")


def quantize(type, input: str | None = None, output: str | None = None, *,  # noqa: A002
             force: bool = False, recipe: str = "ggmerge.yaml", imatrix: str | None = None) -> Path | list[Path]:
    """Write a GGUF of file type ``type`` (default name ``<dir>/<name>.<TYPE>.gguf``) and return its path.

    ``type`` may also be several types (a list, or ``"q4_k_m,q6_k"``): every file is made from one read of
    the input, and the list of paths is returned; ``output`` then names a folder, or nothing.
    ``imatrix``: an importance-matrix file, as ``llama-quantize --imatrix``."""
    names = [t for t in (type.split(",") if isinstance(type, str) else type) if str(t).strip()]
    fts = list(dict.fromkeys(parse_ftype(t) for t in names))
    if not fts:
        raise GGMergeError("name at least one file type (e.g. q4_k_m)", key="type")
    im = load_imatrix_arg(imatrix)
    if input is None:
        src = latest_build_output(recipe)
        log.info("quantizing the latest build of %s: %s", recipe, src)
    else:
        src = Path(input)
        if not src.exists():
            raise GGMergeError("no such file or folder", path=src)
    if len(fts) == 1 and not (output and Path(output).is_dir()):
        outs = [Path(output) if output else quantized_path(src, fts[0])]
    else:
        outs = [quantized_path(src, ft) if not output else Path(output) / quantized_path(src, ft).name
                for ft in fts]
    todo = []
    for ft, out in zip(fts, outs):
        if out.resolve() == src.resolve():
            raise GGMergeError("the output would overwrite the input; name another output with -o", path=out)
        if out.exists() and not force:
            state = _freshness(out, src, ft, imatrix if im is not None else None)
            if state == "fresh":
                log.info("%s is up to date (newer than %s, same file type); use --force to redo it", out, src)
                continue
            if state != "stale":
                raise GGMergeError("output already exists and is not a GGUF of this type made from this input "
                                   "(use --force to replace it)", path=out)
            log.info("%s is older than %s: quantizing again", out, src)
        todo.append((ft, out))
    if todo:
        quantize_many([ft for ft, _ in todo], src, outputs=[o for _, o in todo], imatrix=im,
                      imatrix_arg=imatrix)
    return outs[0] if len(names) == 1 and isinstance(type, str) and "," not in type else outs


def load_imatrix_arg(imatrix: str | os.PathLike | None):
    """The :class:`~ggmerge.imatrix.files.Imatrix` of an ``--imatrix`` argument, or None for none
    (also for a file with no entries: llama-quantize then runs as without one)."""
    if imatrix is None:
        return None
    from .imatrix.files import load_imatrix

    im = load_imatrix(imatrix)
    log.info("imatrix %s: %d entries, %d chunk(s)%s", imatrix, len(im.weights), im.chunk_count,
             f", datasets {im.datasets}" if im.datasets else "")
    return im if im.weights else None


def _with_imatrix(tensors: list, choices: dict[str, Choice], ft: FileType, im, imatrix_arg, where: Path,
                  kept: set[str]) -> None:
    """Attach each re-encoded tensor's importance weights (llama_model_quantize_impl looks an entry up
    only for a tensor whose type changes: not for those in ``kept``)."""
    if im is None:
        return
    missing = 0
    for t in tensors:
        if t.name in kept:
            continue
        shape = tuple(t.shape)
        try:
            t.imatrix = im.for_tensor(t.name, shape[-1], shape[0] if len(shape) == 3 else 1)
        except GGMergeError as exc:
            raise GGMergeError(f"{exc.message} (--imatrix {imatrix_arg})", path=where, tensor=t.name) from None
        missing += t.imatrix is None and choices[t.name].qtype not in _FLOAT_TYPES
    if missing:
        log.info("imatrix has no weights for %d quantized tensor(s) of %s (quantized without, as "
                 "llama-quantize does)", missing, where.name)


def imatrix_kvs(im, imatrix_arg) -> list[tuple[str, object, str]]:
    return [] if im is None else im.quantize_kvs(os.fspath(imatrix_arg))


def _add_kvs(w: gguf.GGUFWriter, kvs) -> None:
    for key, val, kind in kvs:
        w.kv_data[0].pop(key, None)  # gguf_set_val_*: removed, then appended
        if kind == "str":
            w.add_string(key, val)
        else:
            w.add_uint32(key, val)


def quantize_many(fts: list[FileType], src: Path, *, outputs: list[Path] | None = None, imatrix=None,
                  imatrix_arg: str | None = None) -> list[Path]:
    """One GGUF per file type in ``fts`` from ONE read of ``src`` (an HF folder or a GGUF): each tensor
    is loaded and decoded once and encoded for every file. Each file is byte-identical to what a
    separate ``quantize`` of its type writes. Existing outputs are replaced (the caller decides).
    ``imatrix``: a loaded :class:`~ggmerge.imatrix.files.Imatrix` (``imatrix_arg``: its path as given)."""
    from .convert.gguf_out import GGUFFile, OutTensor, _encode
    from .progress import track

    src = Path(src)
    outputs = outputs or [quantized_path(src, ft) for ft in fts]
    if src.is_dir():
        from .sources import open_source

        source = open_source(src)
        close = source.close
        plans = []
        try:
            plans = [plan_source(source, src, ft, imatrix=imatrix, imatrix_arg=imatrix_arg) for ft in fts]
        except BaseException:
            close()
            raise
    else:
        planned = [_plan_gguf(src, ft, imatrix=imatrix, imatrix_arg=imatrix_arg) for ft in fts]
        plans = [p[:3] for p in planned]
        close = lambda: None  # noqa: E731
    files: list[GGUFFile] = []
    try:
        for (arch, metadata, tensors), out in zip(plans, outputs):
            files.append(GGUFFile(out, arch, metadata, tensors))
        per_file = [{t.name: t for t in tensors} for _, _, tensors in plans]
        order = [t.name for t in plans[0][2]]
        total = sum(f.total for f in files)
        with track(f"Quantizing {src.name} to {', '.join(ft.name for ft in fts)}", total, len(order)) as bar:
            for name in order:
                values = None  # decoded once, for every file that re-encodes this tensor
                for f, tensors in zip(files, per_file):
                    t = tensors[name]
                    if t.raw is None:
                        if values is None:
                            values = t.load()
                        t = OutTensor(t.name, t.shape, t.qtype, load=lambda v=values: v, imatrix=t.imatrix)
                    f.put(name, _encode(t, f.path))
                    bar.advance(f.nbytes[name], name=name)
                del values
        return [f.finish() for f in files]
    finally:
        for f in files:
            f.abort()
        close()


def _freshness(out: Path, src: Path, ft, imatrix: str | None = None) -> str:
    """Like make: "fresh" if ``out`` is a GGUF of the asked type newer than every file of its input
    (and than the imatrix), made with the same ``--imatrix`` argument (or none, as recorded in its
    ``quantize.imatrix.file``), "stale" if it is one but older or made otherwise, "foreign" otherwise
    (never overwritten without --force).
    (A hash inside the GGUF would make our files differ from llama-quantize's byte for byte.)"""
    import gguf

    try:
        reader = gguf.GGUFReader(out, "r")
        f = reader.get_field("general.file_type")
        if f is None or int(f.contents()) != int(ft.ftype):
            return "foreign"
        made_with = reader.get_field("quantize.imatrix.file")
        made_with = None if made_with is None else str(made_with.contents())
        newest = max(p.stat().st_mtime_ns for p in ([src] if src.is_file() else src.iterdir()) if p.is_file())
        if imatrix is not None:
            newest = max(newest, Path(imatrix).stat().st_mtime_ns)
    except (OSError, ValueError, KeyError, IndexError):
        return "foreign"
    if made_with != (None if imatrix is None else imatrix_kvs_file(imatrix)):
        return "stale"
    if src.is_dir() and _listed_by_build(out, src):
        return "fresh"
    return "fresh" if out.stat().st_mtime_ns > newest else "stale"


def imatrix_kvs_file(imatrix: str) -> str:
    """What ``quantize.imatrix.file`` holds for ``--imatrix imatrix`` (the argument, cut to 127 bytes)."""
    from .imatrix.files import _cut

    return _cut(os.fspath(imatrix))


def _listed_by_build(out: Path, src: Path) -> bool:
    """``out`` is a GGUF that ``ggmerge build --gguf`` wrote from the build in ``src`` (its record lists
    it, unchanged since): up to date although the HF folder was moved into place after it."""
    from .build import RECORD

    try:
        entry = (json.loads((src / RECORD).read_text(encoding="utf-8")).get("gguf") or {}).get(out.name) or {}
        st = out.stat()
    except (OSError, ValueError, AttributeError):
        return False
    return out.parent.resolve() == src.parent.resolve() and entry.get("size") == st.st_size \
        and entry.get("mtime_ns") == st.st_mtime_ns


# --- where input and output are ------------------------------------------------------------------

def latest_build_output(recipe_path: str | os.PathLike = "ggmerge.yaml") -> Path:
    """The HF folder the last ``ggmerge build`` of ``recipe_path`` wrote (``out/<name>/``).

    Read from the build record ``out/<name>/ggmerge-build.json``; warns when the recipe changed since.
    """
    from .build import RECORD, output_folder as build_output
    from .recipe.schema import load_recipe

    recipe_path = Path(recipe_path)
    if not recipe_path.is_file():
        raise GGMergeError("no INPUT given and no recipe here to take the latest build of "
                           "(name a GGUF file or model folder, or run in the recipe's folder)",
                           path=recipe_path)
    rec = load_recipe(recipe_path)
    folder = build_output(rec)
    record = folder / RECORD
    if not record.is_file():
        raise GGMergeError(f"recipe '{rec.name}' has not been built yet (no {record}); "
                           "run `ggmerge build` first or name an INPUT", path=recipe_path)
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GGMergeError(f"unreadable build record: {exc}", path=record) from None
    out = Path(info.get("output") or folder)
    out = out if out.is_absolute() else recipe_path.resolve().parent / out
    if not out.is_dir():
        raise GGMergeError("the build record names an output folder that no longer exists",
                           path=out)
    if info.get("recipe_sha256") and info["recipe_sha256"] != rec.sha256:
        log.warning("%s changed since it was last built: quantizing the older build in %s "
                    "(run `ggmerge build` to refresh it)", recipe_path, out)
    return out


#: a trailing type tag in a model file name: "model.F16", "ggml-model-bf16", "SmolLM2.Q4_1"
_TYPE_TAG = re.compile(r"[.\-_](f32|f16|bf16|fp16|fp32|q\d(_[a-z0-9]+)*|iq\d\w*|tq\d_\d)$", re.I)


def quantized_path(src: Path, ft: FileType) -> Path:
    """``<dir>/<name>.<TYPE>.gguf`` beside the input: a folder's name, or a file's stem without its
    type tag (``x/m.F16.gguf`` → ``x/m.Q4_K_M.gguf``; ``out/ninja/`` → ``out/ninja.Q4_K_M.gguf``)."""
    src = Path(os.path.abspath(src))
    stem = src.name if src.is_dir() else src.stem
    stem = _TYPE_TAG.sub("", stem) or stem
    return src.parent / f"{stem}.{ft.name}.gguf"


# --- planning: (arch, metadata callback, tensors) ------------------------------------------------

def _report(choices: dict[str, Choice], ft: FileType, where: Path) -> None:
    """Warn for each fallback (llama.cpp prints these too); summarise the mixture."""
    n_fb = 0
    for name, c in choices.items():
        if c.fallback:
            n_fb += 1
            log.warning("%s: %s", name, c.reason)
        elif c.reason:
            log.debug("%s: %s", name, c.reason)
    mix = Counter(c.qtype.name for c in choices.values() if c.quantizable)
    log.info("%s mixture for %s: %s", ft.name, where.name,
             ", ".join(f"{n} × {t}" for t, n in mix.most_common()))
    if n_fb:
        log.warning("%d of %d tensors required fallback quantization", n_fb, len(choices))


def _plan_gguf(path: Path, ft: FileType, *, imatrix=None, imatrix_arg=None):
    from .convert.gguf_out import OutTensor
    from .sources.gguf_data import dequantizable, field, open_reader

    reader = open_reader(path)
    fields = reader.fields

    def get(key):
        return field(reader, key)

    arch = get("general.architecture")
    if not arch:
        raise GGMergeError("GGUF has no general.architecture", path=path, key="general.architecture")
    hp = quant_hparams_from_kv(arch, get)
    by_name = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(x) for x in reversed(t.shape.tolist())) for n, t in by_name.items()}
    choices = choose_types(ft, [(n, shapes[n], t.tensor_type) for n, t in by_name.items()], hp,
                           has_imatrix=imatrix is not None)
    check_imatrix_given(ft, choices, imatrix is not None)
    _report(choices, ft, path)

    requant = sorted({by_name[n].tensor_type.name for n, c in choices.items()
                      if c.qtype != by_name[n].tensor_type and by_name[n].tensor_type not in _FLOAT_TYPES})
    if requant:
        log.warning("%s is already quantized (%s): requantizing loses quality compared with "
                    "quantizing the BF16/F16 original (llama-quantize needs --allow-requantize "
                    "for this)", path.name, ", ".join(requant))

    for qt in {by_name[n].tensor_type for n, c in choices.items() if c.qtype != by_name[n].tensor_type}:
        if not dequantizable(qt):
            bad = next(n for n, c in choices.items() if by_name[n].tensor_type == qt and c.qtype != qt)
            raise GGMergeError(f"cannot decode tensor type {qt.name} to requantize it", path=path, tensor=bad)

    tensors = []
    for name in llama_order(by_name):
        t, c = by_name[name], choices[name]
        if c.qtype == t.tensor_type:
            # llama.cpp copies a tensor that already has its target type verbatim
            tensors.append(OutTensor(name, shapes[name], c.qtype, load=_loader(t, shapes[name], path),
                                     raw=_raw(t, path)))
        else:
            tensors.append(OutTensor(name, shapes[name], c.qtype, load=_loader(t, shapes[name], path)))
    _with_imatrix(tensors, choices, ft, imatrix, imatrix_arg, path,
                  kept={n for n, c in choices.items() if c.qtype == by_name[n].tensor_type})
    kvs = imatrix_kvs(imatrix, imatrix_arg)

    def metadata(w: gguf.GGUFWriter) -> None:
        for key, f in fields.items():
            if key.startswith("GGUF.") or key in _SKIP_KEYS or any(key == k for k, _, _ in kvs):
                continue
            _copy_field(w, f, path)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(int(ft.ftype))
        _add_kvs(w, kvs)

    return arch, metadata, tensors, lambda: None


def _read(t, path: Path) -> np.ndarray:
    """The tensor's stored bytes, read with ``readinto`` rather than through gguf-py's map, so a
    whole-file pass does not leave the input resident (see ``ggmerge.sources.gguf_data``)."""
    from .sources.gguf_data import read_tensor_data

    try:
        with open(path, "rb", buffering=0) as f:
            return read_tensor_data(f, t, path)
    except OSError as exc:
        raise GGMergeError(f"cannot read: {exc.strerror or exc}", path=path, tensor=t.name) from None


def _loader(t, shape: tuple[int, ...], path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        data = _read(t, path)
        try:
            if t.tensor_type == QType.F32:
                arr = np.asarray(data, dtype=np.float32)
            else:
                arr = gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise GGMergeError(f"cannot decode tensor type {t.tensor_type.name}", path=path,
                               tensor=t.name) from None
        # the input is at fault: name it, not the output (min/max: one pass, no bool temporary)
        if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
            raise GGMergeError("holds NaN or infinite values", path=path, tensor=t.name)
        return arr.reshape(shape)
    return load


def _raw(t, path: Path) -> Callable[[], np.ndarray]:
    return lambda: _read(t, path).view(np.uint8).reshape(-1)


def _copy_field(w: gguf.GGUFWriter, f, path: Path) -> None:
    vtype = f.types[0]
    sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 2:
        log.warning("%s: skipping metadata key '%s' (nested arrays are not copied)", path.name, f.name)
        return
    val = f.contents()
    if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
        log.warning("%s: skipping empty metadata array '%s' (gguf-py cannot write one)", path.name, f.name)
        return
    if f.name == "general.alignment":
        w.data_alignment = int(val)
    w.add_key_value(f.name, val, vtype, sub_type=sub)


def plan_source(source, folder: Path, ft: FileType, *, imatrix=None, imatrix_arg=None):
    from .convert.hf_to_gguf import plan_gguf
    from .tokenizer.hf_vocab import read_hf

    tdir = source.tokenizer_dir()
    if tdir is None:
        raise GGMergeError("no tokenizer files (tokenizer.model or tokenizer.json); llama.cpp "
                           "needs the vocabulary inside the GGUF", path=folder)
    base_meta, planned = plan_gguf(source, read_hf(tdir), source.config(), "bf16",
                                   name=folder.resolve().name)

    family = family_for(source.config(), path=folder)
    probe = gguf.GGUFWriter(None, family.gguf_arch)
    base_meta(probe)
    kv = {k: v.value for k, v in probe.kv_data[0].items()}
    arch = family.gguf_arch
    hp = family.quant_hparams(kv.get)
    choices = choose_types(ft, [(t.name, t.shape, t.qtype) for t in planned], hp, has_imatrix=imatrix is not None)
    check_imatrix_given(ft, choices, imatrix is not None)
    _report(choices, ft, folder)

    by_name = {t.name: t for t in planned}
    tensors = []
    for name in llama_order(by_name):
        t, c = by_name[name], choices[name]
        tensors.append(type(t)(name, tuple(t.shape), c.qtype, load=_rounded(t.load, t.qtype)))
    # the planned type is what llama-quantize would read: a tensor kept at it is not re-encoded
    _with_imatrix(tensors, choices, ft, imatrix, imatrix_arg, folder,
                  kept={n for n, c in choices.items() if c.qtype == by_name[n].qtype})
    kvs = imatrix_kvs(imatrix, imatrix_arg)

    def metadata(w: gguf.GGUFWriter) -> None:
        base_meta(w)
        # llama.cpp's gguf_set_val_u32 removes a key and appends it: these two end up last
        for key in ("general.quantization_version", "general.file_type"):
            w.kv_data[0].pop(key, None)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(int(ft.ftype))
        _add_kvs(w, kvs)

    return arch, metadata, tensors


def _rounded(load: Callable[[], np.ndarray], planned: QType) -> Callable[[], np.ndarray]:
    """float32 values exactly as a ``planned``-type (BF16/F16) file would hold them."""
    if planned not in (QType.BF16, QType.F16):
        return load

    def f() -> np.ndarray:
        import torch

        from .dtypes import round_trip

        dt = torch.bfloat16 if planned == QType.BF16 else torch.float16
        return round_trip(torch.from_numpy(np.ascontiguousarray(load(), dtype=np.float32)), dt).numpy()
    return f

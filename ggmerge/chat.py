"""``ggmerge chat``: one turn through llama.cpp using the GGUF's own chat template (a smoke test).

The equivalent llama-cpp-python snippet::

    from llama_cpp import Llama
    llm = Llama(model_path="out/ninja.Q4_K_M.gguf", n_ctx=4096)   # template read from the GGUF
    llm.create_chat_completion(messages=[{"role": "system", "content": "..."},
                                         {"role": "user", "content": "..."}])
"""
from __future__ import annotations

from pathlib import Path

from .errors import GGMergeError


def chat(gguf: str, message: str, *, system: str = "", max_tokens: int = 64) -> str:
    from .report import out
    from .llamacpp import load

    p = Path(gguf)
    if not p.is_file():
        raise GGMergeError("no such GGUF file", path=p)
    import jinja2

    llm = load(p, n_ctx=2048, f32_cache=False, seed=0)
    try:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": message}]
        try:
            res = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
        except jinja2.TemplateError as exc:  # SecurityError included: the sandbox refused the template
            raise GGMergeError(f"the GGUF's chat template cannot be rendered: {exc}", path=p,
                               key="tokenizer.chat_template") from None
    finally:
        llm.close()
    text = res["choices"][0]["message"]["content"]
    out.print(text)
    return text

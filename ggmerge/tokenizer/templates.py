"""Chat templates: the built-in ``vicuna`` one and the rule for choosing what goes into the GGUF.

``VICUNA`` renders exactly the prompt format the seed model card documents (Ninja-v1-RP-expressive):
the system text on its own line(s), then ``USER: …`` and ``ASSISTANT: …</s>`` turns one per line,
and ``ASSISTANT:`` (no trailing space) as the generation prompt::

    {system}
    USER: {user 1}
    ASSISTANT: {assistant 1}</s>
    USER: {user 2}
    ASSISTANT:

It is written for both consumers of ``tokenizer.chat_template``: Jinja renderers (transformers'
``apply_chat_template``, llama-cpp-python's ``Jinja2ChatFormatter``, ``llama-server --jinja``) run it;
llama.cpp's built-in path (``llm_chat_detect_template`` in src/llama-chat.cpp) classifies it by
substrings — it contains ``USER: `` and ``ASSISTANT: ``, not ``SYSTEM: ``, and none of the markers
of the rules checked earlier (``<|im_start|>``, ``[INST]``, ``<start_of_turn>``, …), so it is
*vicuna*. (llama.cpp's own vicuna rendering puts a blank line after the system text; the Jinja one
follows the model card.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import GGMergeError, did_you_mean

VICUNA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- 'USER: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + message['content'] + eos_token + '\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('vicuna template: unknown role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- 'ASSISTANT:' -}}"
    "{%- endif -%}"
)

#: built-in templates by name
BUILTIN = {"vicuna": VICUNA}


def resolve_template(spec: str | os.PathLike | None) -> str | None:
    """The template text for ``spec``: None → None; a built-in name ('vicuna'); or a file path.

    A file may be a plain Jinja template (``.jinja``, ``.txt``, …) or an HF ``tokenizer_config.json``
    / ``chat_template.json`` holding a ``chat_template`` string.
    """
    if spec is None:
        return None
    text = str(spec)
    if text.lower() in BUILTIN:
        return BUILTIN[text.lower()]
    path = Path(os.path.expanduser(text))
    if not path.is_file():
        hint = did_you_mean(text, BUILTIN)
        raise GGMergeError(
            f"chat template is neither a built-in ({', '.join(BUILTIN)}) nor an existing file{hint}",
            path=path, key="chat_template")
    try:
        body = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GGMergeError(f"cannot read chat template: {exc}", path=path, key="chat_template") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise GGMergeError(f"not valid JSON: {exc}", path=path, key="chat_template") from None
        body = data.get("chat_template") if isinstance(data, dict) else None
        if not isinstance(body, str):
            raise GGMergeError("JSON file has no 'chat_template' string", path=path, key="chat_template")
    if not body.strip():
        raise GGMergeError("chat template file is empty", path=path, key="chat_template")
    return body


def choose_template(spec: str | os.PathLike | None, own: str | None) -> str | None:
    """What goes into the output: the user's template when given (it replaces the model's), else the
    model's own, else none."""
    return resolve_template(spec) if spec is not None else own

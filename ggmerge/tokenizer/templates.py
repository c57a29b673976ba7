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

mergekit's built-in names (``chatml``, ``llama3``, ``alpaca``, ``mistral``, ``exaone``) are its files
``mergekit/_data/chat_templates/<name>.jinja`` (mergekit 0.1.5, LGPL-3.0), stored unchanged in
``chat_templates/`` beside this module: mergekit writes a file's text as it is (not stripped), so those
bytes are what users of those names get (tests/test_templates.py pins their SHA-256). ``auto`` (the plurality
template of the stage's inputs) needs the models, so the planner resolves it (``ggmerge.recipe.plan``).
"""
from __future__ import annotations

import json
import os
from collections import Counter
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

#: mergekit's built-in template names (its ``_data/chat_templates/*.jinja``)
MERGEKIT_NAMES = ("chatml", "llama3", "alpaca", "mistral", "exaone")
TEMPLATE_DIR = Path(__file__).with_name("chat_templates")
#: the name that takes the template from the stage's input models (resolved at plan time)
AUTO = "auto"


def _stored(name: str) -> str:
    # read as mergekit reads its own copy (text mode, UTF-8); the files hold no CR, so this is their bytes
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


#: built-in templates by name: ggmerge's ``vicuna`` and mergekit's names
BUILTIN = {"vicuna": VICUNA, **{n: _stored(n) for n in MERGEKIT_NAMES}}


def builtin_names(*, auto: bool = False) -> str:
    return ", ".join(list(BUILTIN) + ([AUTO] if auto else []))


def is_literal(spec: str) -> bool:
    """A recipe's ``chat_template`` holding the Jinja text itself. mergekit takes any value that is not
    one of its names and contains ``{`` as a template (refusing ones shorter than 20 characters); a
    Jinja tag or expression marks a short one as a template too."""
    return "{" in spec and (len(spec) >= 20 or "{{" in spec or "{%" in spec)


def resolve_recipe_template(spec: str, root: Path) -> str:
    """The text of a recipe's ``chat_template`` other than ``auto``, checked in mergekit's order: a
    built-in name (before any file of that name), a literal Jinja string, else a file — relative to
    the recipe's folder ``root``, else as given (a ggmerge extension; mergekit has no file form).
    Raises GGMergeError (key ``chat_template``) for anything else, naming what is supported."""
    if spec.lower() in BUILTIN:
        return BUILTIN[spec.lower()]
    if is_literal(spec):
        return spec
    for path in (root / os.path.expanduser(spec), Path(os.path.expanduser(spec))):
        if path.is_file():
            return resolve_template(path)
    raise GGMergeError(
        f"chat template '{spec}' is neither a built-in name ({builtin_names(auto=True)}), a Jinja string "
        f"nor a file (relative to the recipe){did_you_mean(spec, list(BUILTIN) + [AUTO])}",
        key="chat_template")


def plurality_template(templates: list[str | None]) -> str | None:
    """``chat_template: auto``: the template most of the inputs have (whitespace-stripped, as mergekit
    compares and writes them), ignoring inputs without one; a tie goes to the earliest input (pass
    the base first). mergekit breaks ties by its set order of models, which varies between runs;
    this is the same choice whenever mergekit's is well defined. None when no input has one."""
    stripped = [t.strip() for t in templates if t]
    if not stripped:
        return None
    counts = Counter(stripped)
    best = max(counts.values())
    return next(t for t in stripped if counts[t] == best)


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
            f"chat template is neither a built-in ({builtin_names()}) nor an existing file{hint}",
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

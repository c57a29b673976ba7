"""The built-in vicuna template renders the seed's prompts exactly, in every renderer that reads
``tokenizer.chat_template``; llama.cpp's detector classifies it as vicuna; ``resolve_template`` rules."""
from __future__ import annotations

import ctypes
import json

import pytest
from models import SEED_CONVERSATION, SEED_PROMPT_TURN1, SEED_PROMPT_TURN2, SEED_SYSTEM, write_tokenizer_dir

from ggmerge.errors import GGMergeError
from ggmerge.tokenizer.templates import VICUNA, choose_template, resolve_template


def test_seed_prompts_are_the_model_card_format():
    # guard against an edit of the transcribed constants: the card's structure, line by line
    lines = SEED_PROMPT_TURN2.split("\n")
    assert lines[-4:-3] == [SEED_PROMPT_TURN1.split("\n")[-2]]
    assert lines[-3].startswith("ASSISTANT: 桜「") and lines[-3].endswith("</s>")
    assert lines[-2].startswith("USER: 悠人「うん") and lines[-1] == "ASSISTANT:"
    assert SEED_PROMPT_TURN1.startswith(SEED_SYSTEM + "\nUSER: ")
    assert SEED_PROMPT_TURN2.startswith(SEED_PROMPT_TURN1 + " ")
    assert [m["role"] for m in SEED_CONVERSATION] == ["system", "user", "assistant", "user"]


def test_vicuna_renders_seed_with_llama_cpp_python_formatter():
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=VICUNA, eos_token="</s>", bos_token="<s>")
    assert fmt(messages=SEED_CONVERSATION).prompt == SEED_PROMPT_TURN2
    assert fmt(messages=SEED_CONVERSATION[:2]).prompt == SEED_PROMPT_TURN1
    # without a system message the prompt starts at the first turn
    assert fmt(messages=SEED_CONVERSATION[1:2]).prompt == SEED_PROMPT_TURN1.split("\n")[-2] + "\nASSISTANT:"


def test_vicuna_renders_seed_with_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(write_tokenizer_dir(tmp_path / "tok", chat_template=VICUNA))
    text = tok.apply_chat_template(SEED_CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == SEED_PROMPT_TURN2
    # the whole conversation without a generation prompt ends with the last user line
    closed = tok.apply_chat_template(SEED_CONVERSATION[:3], tokenize=False, add_generation_prompt=False)
    assert closed == SEED_PROMPT_TURN2.rsplit("\nUSER: ", 1)[0] + "\n"


def test_vicuna_rejects_unknown_roles():
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=VICUNA, eos_token="</s>", bos_token="<s>")
    with pytest.raises(Exception, match="unknown role tool"):
        fmt(messages=[{"role": "tool", "content": "x"}])


def _render(tmpl: bytes, messages) -> str | None:
    import llama_cpp

    chat = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, m in enumerate(messages):
        keep += [m["role"].encode(), m["content"].encode()]
        chat[i].role, chat[i].content = keep[-2], keep[-1]
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(messages), True, buf, len(buf))
    return buf.raw[:n].decode() if n > 0 else None


def test_llama_cpp_detects_vicuna():
    """llm_chat_detect_template (src/llama-chat.cpp) picks vicuna, not vicuna-orca or anything earlier."""
    got = _render(VICUNA.encode(), SEED_CONVERSATION)
    assert got is not None
    assert got == _render(b"vicuna", SEED_CONVERSATION)
    assert got != _render(b"vicuna-orca", SEED_CONVERSATION)
    # an unrecognisable template is refused, so the comparison above is not vacuous
    assert _render(b"{{ messages }}", SEED_CONVERSATION) is None


def test_resolve_template(tmp_path):
    assert resolve_template(None) is None
    assert resolve_template("vicuna") == VICUNA == resolve_template("Vicuna")
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert resolve_template(str(jinja)) == "{{ messages[0]['content'] }}"
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": "X{{ bos_token }}"}))
    assert resolve_template(cfg) == "X{{ bos_token }}"


def test_resolve_template_errors(tmp_path):
    with pytest.raises(GGMergeError, match="did you mean 'vicuna'") as exc:
        resolve_template("vicuan")
    assert exc.value.key == "chat_template"
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    with pytest.raises(GGMergeError, match="empty") as exc:
        resolve_template(empty)
    assert exc.value.path == empty
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no": "template"}))
    with pytest.raises(GGMergeError, match="chat_template"):
        resolve_template(bad)


def test_choose_template():
    assert choose_template(None, "own") == "own"
    assert choose_template(None, None) is None
    assert choose_template("vicuna", "own") == VICUNA

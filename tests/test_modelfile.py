"""The Modelfile: its Go TEMPLATE, rendered, equals the Jinja chat template for known families."""

from __future__ import annotations

import pytest

import tiny
from serve.modelfile import FAMILIES, detect_family, modelfile_text, render_go_template, write_modelfile

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "And 4 * 5?\nTwo lines."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}],
]


def _jinja(family: str):
    """A tokenizer carrying that family's Jinja template (Axolotl's copy of it)."""
    from axolotl.utils.chat_templates import get_chat_template

    tokenizer = tiny.build_tokenizer(None, bos_token="<|endoftext|>")
    tokenizer.chat_template = {"chatml": tiny.CHATML_TEMPLATE, "llama3": get_chat_template("llama3"),
                               "mistral": get_chat_template("mistral_v1")}[family]
    return tokenizer


@pytest.mark.parametrize("family", ["chatml", "llama3", "mistral"])
def test_go_template_renders_like_the_jinja_template(family):
    tokenizer = _jinja(family)
    spec = detect_family(tokenizer.chat_template)
    assert spec is not None and spec.name == family
    for messages in CONVERSATIONS:
        if family == "mistral" and messages[0]["role"] == "system":
            continue  # Mistral v1 folds a system prompt into the user turn; not templated here
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want = want.removeprefix(tokenizer.bos_token)  # BOS is a token llama.cpp/Ollama add, not text
        assert render_go_template(spec.go_template(tokenizer.eos_token), messages) == want


def test_modelfile_lines(tmp_path):
    path = write_modelfile(tmp_path, "model-q4_k_m.gguf", tiny.CHATML_TEMPLATE, num_ctx=2048, eos_token="<|im_end|>")
    text = path.read_text()
    assert text.startswith("FROM ./model-q4_k_m.gguf\n")
    assert 'TEMPLATE """' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER num_ctx 2048" in text and not (tmp_path / "Modelfile.partial").exists()
    unknown = modelfile_text("m.gguf", "{{ messages }}", 512)
    assert "TEMPLATE" not in unknown and "embedded in the GGUF" in unknown
    assert {f.name for f in FAMILIES} == {"chatml", "llama3", "mistral"}
    mistral = modelfile_text("m.gguf", "[INST] {{ x }}", 512, eos_token="</s>")
    assert 'PARAMETER stop "</s>"' in mistral and "{eos}" not in mistral

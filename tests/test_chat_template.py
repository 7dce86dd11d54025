"""core.chat_template renders as transformers' apply_chat_template does, on every chat template
Axolotl ships: serving (a GGUF's template, without transformers) renders the prompt training saw."""

from __future__ import annotations

import pytest
import tiny
from jinja2 import TemplateError

from orpo_plugin.core.chat_template import render

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": 'Q "quoted" ünïcödé'}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And 4 * 5?\nTwo lines."},
    ],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ],
    [{"role": "assistant", "content": "out of order"}],
]


def _axolotl_templates():
    from axolotl.utils.chat_templates import _CHAT_TEMPLATES

    return sorted(_CHAT_TEMPLATES.items())


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(None, bos_token="<|endoftext|>")


@pytest.mark.parametrize("name,template", _axolotl_templates(), ids=[n for n, _ in _axolotl_templates()])
def test_renders_like_transformers(name, template, tokenizer):
    compared = 0
    for messages in CONVERSATIONS:
        for generation in (True, False):
            try:
                want = tokenizer.apply_chat_template(
                    messages, chat_template=template, tokenize=False, add_generation_prompt=generation
                )
            except TemplateError:
                with pytest.raises(TemplateError):
                    render(template, messages, generation, **tokenizer.special_tokens_map)
                continue
            got = render(template, messages, generation, **tokenizer.special_tokens_map)
            assert got == want, (messages, generation)
            compared += 1
    assert compared >= 2

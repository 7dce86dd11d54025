"""Jinja chat templates rendered the way transformers' `apply_chat_template` renders them, for
tokenizers that are not transformers' (a GGUF's, through llama.cpp): the same sandbox, the same
whitespace rules, the same helpers (`raise_exception`, `strftime_now`, `tojson`, loop controls,
`{% generation %}` blocks). tests/test_chat_template.py checks it against transformers on every
chat template Axolotl ships, so serving renders a prompt exactly as training did."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import ClassVar

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for masks; it renders as its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render(template: str, messages: list[dict], add_generation_prompt: bool = False, **special_tokens) -> str:
    """The template applied to messages; special_tokens are bos_token, eos_token, ... as the
    tokenizer defines them. Raises jinja2.TemplateError where the template does."""
    return compile_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
    )

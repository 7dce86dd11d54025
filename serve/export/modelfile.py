"""Ollama Modelfile: FROM the GGUF, a Go TEMPLATE for known chat-template families with their
stop strings, the template's default system prompt as SYSTEM, num_ctx.

Ollama may not map an imported GGUF's Jinja template to a Go one, so a known family gets an
explicit TEMPLATE. A family is a table row: how each role's turn is wrapped and where a system
prompt goes. The same row renders a conversation in Python, which is how the family is
recognised (the model's own Jinja template, rendered by core.chat_template, must give the same
text on probe conversations), and writes the Go template; tests render that Go template with Go's
own text/template and compare it with transformers' apply_chat_template. A template of no known
family keeps the one embedded in the GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from jinja2 import TemplateError

from orpo_plugin.core.atomic import write_text
from orpo_plugin.core.chat_template import render

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatFamily:
    name: str
    turns: dict[str, tuple[str, str]]  # role -> (before, after) its content; "{role}" is the role's name
    system: str  # "turn": a turn of its own; "first_user" / "last_user": prepended to that user turn
    generation: str  # what opens the assistant's reply
    stops: tuple[str, ...]  # "{eos}": the model's EOS text
    system_separator: str = "\n\n"
    default_system: str | None = None  # written when the conversation does not open with a system turn

    # -- Python: the conversation as this family writes it --------------------------------
    def render(self, messages: list[dict], eos: str) -> str:
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        host = {"first_user": users[:1], "last_user": users[-1:]}.get(self.system, [])
        out = []
        for i, message in enumerate(messages):
            if message["role"] == "system" and self.system != "turn":
                continue
            content = message["content"]
            if system and i in host:
                content = system + self.system_separator + content
            before, after = self.turns[message["role"]]
            out.append(_fill(before, message["role"], eos) + content + _fill(after, message["role"], eos))
        return "".join(out) + _fill(self.generation, "assistant", eos)

    # -- Go: the same, as an Ollama TEMPLATE over .Messages and .System ----------------------
    def go_template(self, eos: str) -> str:
        host = {"first_user": "(eq $i 1)", "last_user": "(eq (len (slice $.Messages $i)) 1)"}.get(self.system)
        branches = []
        for role in ROLES:
            if role == "system" and self.system != "turn":
                continue
            before, after = (_go(part, eos) for part in self.turns[role])
            inject = (
                f"{{{{ if and $.System {host} }}}}{{{{ $.System }}}}{self.system_separator}{{{{ end }}}}"
                if role == "user" and host
                else ""
            )
            branches.append(
                f'{{{{ {"if" if not branches else "else if"} eq .Role "{role}" }}}}'
                f"{before}{inject}{{{{ .Content }}}}{after}"
            )
        return "{{- range $i, $_ := .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + _go(self.generation, eos)

    def stop_strings(self, eos: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(stop.replace("{eos}", eos) for stop in self.stops))


def _fill(text: str, role: str, eos: str) -> str:
    return text.replace("{role}", role).replace("{eos}", eos)


def _go(text: str, eos: str) -> str:
    return text.replace("{eos}", eos).replace("{role}", "{{ .Role }}")


_CHATML = ("<|im_start|>{role}\n", "<|im_end|>\n")
_LLAMA3 = ("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")
# fmt: off
FAMILIES = (
    ChatFamily("chatml", {r: _CHATML for r in ROLES}, "turn", "<|im_start|>assistant\n",
               ("<|im_start|>", "<|im_end|>")),
    ChatFamily("llama3", {r: _LLAMA3 for r in ROLES}, "turn", "<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    # Mistral v1 (Axolotl's mistral_v1): the system prompt opens the first user turn.
    ChatFamily("mistral_v1", {"user": (" [INST] ", " [/INST]"), "assistant": (" ", "{eos}")}, "first_user", "",
               ("[INST]", "[/INST]", "{eos}")),
    # Mistral v0.2/v0.3 (mistral_v2v3) and the Tekken tokenizer's v3 (Nemo): it opens the last one.
    ChatFamily("mistral", {"user": ("[INST] ", "[/INST]"), "assistant": (" ", "{eos}")}, "last_user", "",
               ("[INST]", "[/INST]", "{eos}")),
    ChatFamily("mistral_tekken", {"user": ("[INST]", "[/INST]"), "assistant": ("", "{eos}")}, "last_user", "",
               ("[INST]", "[/INST]", "{eos}")),
)
# fmt: on

# Conversations a family must render exactly as the model's template does. Those the template
# refuses (Mistral v0.1 raises on a system turn) are not compared; it must accept the first two.
PROBES = (
    [{"role": "user", "content": "Q1"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ],
)


def jinja_render(jinja_template: str, messages: list[dict], bos: str, eos: str) -> str:
    """The template's text for a chat prompt, without the BOS text (llama.cpp and Ollama add BOS
    as a token)."""
    text = render(jinja_template, messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    return text.removeprefix(bos) if bos else text


def detect_family(jinja_template: str | None, eos: str = "</s>", bos: str = "<s>") -> ChatFamily | None:
    if not jinja_template:
        return None
    rendered = []
    for i, probe in enumerate(PROBES):
        try:
            rendered.append(jinja_render(jinja_template, probe, bos, eos))
        except TemplateError:
            if i < 2:
                return None
            rendered.append(None)
    for family in FAMILIES:
        family = replace(family, default_system=_default_system(family, rendered[0], eos))
        if all(text is None or text == family.render(probe, eos) for probe, text in zip(PROBES, rendered)):
            return family
    return None


def _default_system(family: ChatFamily, first: str, eos: str) -> str | None:
    """The system prompt a template writes into a conversation without one (`first` is its
    rendering of the first probe, which has none), for families with a system turn of their own."""
    if family.system != "turn":
        return None
    before, after = (_fill(part, "system", eos) for part in family.turns["system"])
    if not first.startswith(before) or after not in first[len(before) :]:
        return None
    return first[len(before) : first.index(after, len(before))]


def modelfile_text(
    gguf_name: str, jinja_template: str | None, num_ctx: int, eos_token: str = "</s>", bos_token: str | None = None
) -> str:
    family = detect_family(jinja_template, eos_token, bos_token or "")
    lines = [f"FROM ./{gguf_name}", ""]
    if family is None:
        lines += ["# Unknown chat-template family: Ollama uses the template embedded in the GGUF.", ""]
    else:
        lines += [f"# Chat template family: {family.name}", f'TEMPLATE """{family.go_template(eos_token)}"""', ""]
        if family.default_system is not None:
            lines += [
                "# The chat template's own system prompt, used when a conversation does not start with one.",
                f'SYSTEM """{family.default_system}"""',
                "",
            ]
        lines += [f'PARAMETER stop "{stop}"' for stop in family.stop_strings(eos_token)]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def write_modelfile(
    out_dir: str | Path,
    gguf_name: str,
    jinja_template: str | None,
    num_ctx: int,
    eos_token: str = "</s>",
    bos_token: str | None = None,
) -> Path:
    return write_text(
        Path(out_dir) / "Modelfile", modelfile_text(gguf_name, jinja_template, num_ctx, eos_token, bos_token)
    )

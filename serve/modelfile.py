"""Ollama Modelfile: FROM the GGUF, a Go TEMPLATE for known chat-template families with their
stop strings, num_ctx. Ollama may not map an imported GGUF's Jinja template to a Go one, so
known families get an explicit TEMPLATE; an unknown family relies on the embedded template."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatFamily:
    name: str
    marker: str  # a string only this family's Jinja template contains
    template: str  # Go text/template over .Messages (.Role, .Content); {eos}: the model's EOS
    stops: tuple[str, ...]

    def go_template(self, eos_token: str) -> str:
        return self.template.replace("{eos}", eos_token)

    def stop_strings(self, eos_token: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(stop.replace("{eos}", eos_token) for stop in self.stops))


FAMILIES = (
    ChatFamily(
        "chatml", "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
    ChatFamily(
        "llama3", "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    ChatFamily(
        "mistral", "[INST]",
        '{{- range .Messages }}{{ if eq .Role "user" }} [INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }} {{ .Content }}{eos}{{ end }}{{ end }}',
        ("[INST]", "[/INST]", "{eos}"),
    ),
)


def detect_family(jinja_template: str | None) -> ChatFamily | None:
    matches = [f for f in FAMILIES if jinja_template and f.marker in jinja_template]
    return matches[0] if len(matches) == 1 else None


def modelfile_text(gguf_name: str, jinja_template: str | None, num_ctx: int, eos_token: str = "</s>") -> str:
    family = detect_family(jinja_template)
    lines = [f"FROM ./{gguf_name}", ""]
    if family is None:
        lines += ["# Unknown chat-template family: Ollama uses the template embedded in the GGUF.", ""]
    else:
        lines += [f"# Chat template family: {family.name}", f'TEMPLATE """{family.go_template(eos_token)}"""', ""]
        lines += [f'PARAMETER stop "{stop}"' for stop in family.stop_strings(eos_token)]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: str | Path, gguf_name: str, jinja_template: str | None, num_ctx: int,
                    eos_token: str = "</s>") -> Path:
    path = Path(out_dir) / "Modelfile"
    tmp = path.with_name("Modelfile.partial")
    tmp.write_text(modelfile_text(gguf_name, jinja_template, num_ctx, eos_token), encoding="utf-8")
    tmp.replace(path)
    return path


# -- a renderer for the Go text/template subset above, to test templates against Jinja ----
_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def render_go_template(template: str, messages: list[dict]) -> str:
    """Renders `range .Messages`, `if/else if eq .Role "x"`, `.Role`, `.Content` and the
    `{{-`/`-}}` whitespace trims, as Go's text/template does."""
    tokens, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "trim_next":
            tokens.pop()
            text = text.lstrip()
        tokens.append(("text", text))
        tokens.append(("action", m.group(2)))
        if m.group(3):
            tokens.append(("trim_next", ""))
        pos = m.end()
    tail = template[pos:]
    if tokens and tokens[-1][0] == "trim_next":
        tokens.pop()
        tail = tail.lstrip()
    tokens.append(("text", tail))
    tree, rest = _parse(tokens, 0)
    return "".join(_eval(tree, {"Messages": messages}))


def _parse(tokens, i, stop=("end",)):
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
        elif value in stop or value.startswith("else"):
            return nodes, i
        elif value.startswith("range "):
            body, i = _parse(tokens, i + 1)
            nodes.append(("range", value.split()[1].lstrip("."), body))
            i += 1
        elif value.startswith("if "):
            branches, cond = [], value[3:]
            while True:
                body, i = _parse(tokens, i + 1)
                branches.append((cond, body))
                tag = tokens[i][1]
                if tag == "end":
                    break
                cond = tag[len("else if "):] if tag.startswith("else if ") else None
            nodes.append(("if", branches))
            i += 1
        else:
            nodes.append(("field", value.lstrip(".")))
            i += 1
    return nodes, i


def _truth(cond: str | None, scope: dict) -> bool:
    if cond is None:
        return True
    op, field, literal = cond.split(maxsplit=2)
    assert op == "eq", f"unsupported template condition {cond!r}"
    return scope[field.lstrip(".")] == literal.strip('"')


def _eval(nodes, scope):
    for node in nodes:
        if node[0] == "text":
            yield node[1]
        elif node[0] == "field":
            yield str(scope[node[1].capitalize()] if node[1] not in scope else scope[node[1]])
        elif node[0] == "range":
            for item in scope[node[1]]:
                yield from _eval(node[2], {"Role": item["role"], "Content": item["content"]})
        elif node[0] == "if":
            for cond, body in node[1]:
                if _truth(cond, scope):
                    yield from _eval(body, scope)
                    break

"""Ollama Modelfile: FROM the GGUF, a Go TEMPLATE for known chat-template families with their
stop strings, num_ctx. Ollama may not map an imported GGUF's Jinja template to a Go one, so
known families get an explicit TEMPLATE; an unknown family relies on the embedded template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orpo_plugin.core.atomic import write_text


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
    return write_text(Path(out_dir) / "Modelfile", modelfile_text(gguf_name, jinja_template, num_ctx, eos_token))

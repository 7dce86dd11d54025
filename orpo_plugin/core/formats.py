"""Preference-dataset formats: each turns one row into a normalized (prompt, chosen, rejected).

A format is data: a name, a detector that recognises the row's shape by its keys, a function
row -> Pair that raises BadRow with the field and the reason, and a one-line description for
error messages. Built-ins are registered through the same pluggy hook third parties use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orpo_plugin.core import registry
from orpo_plugin.core.errors import OrpoError
from orpo_plugin.core.hookspecs import hookimpl

ROLES = ("system", "user", "assistant")


class OrpoDataError(OrpoError, ValueError):
    """Bad input data: the message names the dataset, the row, the field and the fix."""


class BadRow(OrpoError, ValueError):
    """A row that cannot be trained on. `reason` is a stable code used in skip summaries."""

    def __init__(self, field: str, reason: str, detail: str):
        super().__init__(f"field '{field}': {detail}")
        self.field, self.reason, self.detail = field, reason, detail


REASONS = {
    "missing": "missing field",
    "null": "null value",
    "empty": "empty or whitespace-only text",
    "not_string": "not a string",
    "identical": "chosen identical to rejected",
    "not_assistant_last": "conversation does not end in an assistant turn",
    "role_order": "roles out of order",
    "different_prompts": "chosen and rejected conversations have different prompts",
    "unknown_role": "unknown role",
    "bad_message": "malformed message",
    "invalid_json": "invalid JSON line",
    "unknown_format": "matches no preference format",
    "ambiguous_format": "matches several preference formats",
}


@dataclass(frozen=True)
class Pair:
    """prompt: chat messages (optional system, then alternating user/assistant, ending with
    user); chosen, rejected: the two assistant answers as plain text."""

    prompt: list[dict]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PreferenceFormat:
    name: str
    shape: str  # what a row looks like, for error messages
    detect: Callable[[Mapping[str, Any]], bool]
    to_pair: Callable[[Mapping[str, Any]], Pair]


# -- field checks ---------------------------------------------------------------------
def text(row: Mapping, field: str) -> str:
    if field not in row:
        raise BadRow(field, "missing", REASONS["missing"])
    value = row[field]
    if value is None:
        raise BadRow(field, "null", REASONS["null"])
    if not isinstance(value, str):
        raise BadRow(field, "not_string", f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(field, "empty", REASONS["empty"])
    return value


def optional_system(row: Mapping, field: str = "system") -> list[dict]:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    return [{"role": "system", "content": text(row, field)}]


def messages(value: Any, field: str) -> list[dict]:
    """A list of {role, content} with known roles and non-empty string content."""
    if value is None:
        raise BadRow(field, "null", REASONS["null"])
    if not isinstance(value, list) or not value:
        raise BadRow(field, "bad_message", "expected a non-empty list of {role, content} messages")
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise BadRow(where, "bad_message", "expected a message with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise BadRow(
                f"{where}.role", "unknown_role", f"unknown role {message['role']!r} (allowed: {', '.join(ROLES)})"
            )
        try:
            content = text(message, "content")
        except BadRow as err:
            raise BadRow(f"{where}.content", err.reason, err.detail) from None
        out.append({"role": message["role"], "content": content})
    return out


def check_prompt_order(prompt: list[dict], field: str) -> list[dict]:
    """Optional system first, then user/assistant alternating, ending with a user turn."""
    turns = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise BadRow(
                field, "role_order", f"roles out of order: turn {i} is {message['role']!r}, expected {expected!r}"
            )
    if not turns or turns[-1]["role"] != "user":
        raise BadRow(field, "role_order", "the prompt must end with a user turn")
    return prompt


def answer(row: Mapping, field: str, prompt: list[dict] | None = None) -> str:
    """A response given as text, as one assistant message, or as a conversation whose last
    turn is the answer (its earlier turns must then equal the prompt)."""
    value = row.get(field)
    if isinstance(value, Mapping):  # one message: {"role": "assistant", "content": ...}
        value = [value]
    if not isinstance(value, list):
        return text(row, field)
    convo = messages(value, field)
    if convo[-1]["role"] != "assistant":
        raise BadRow(field, "not_assistant_last", REASONS["not_assistant_last"])
    if len(convo) > 1 and prompt is not None and convo[:-1] != prompt:
        raise BadRow(field, "different_prompts", "the turns before the answer differ from the prompt")
    return convo[-1]["content"]


def distinct(pair: Pair) -> Pair:
    if pair.chosen.strip() == pair.rejected.strip():
        raise BadRow("rejected", "identical", REASONS["identical"])
    return pair


# -- built-in formats -------------------------------------------------------------------
def _prompt_pair(row: Mapping) -> Pair:
    """prompt (text or messages) + chosen/rejected (text, one assistant message, or the full
    conversation), optional system. TRL's standard form and UltraFeedback-binarized."""
    if "prompt" not in row:
        raise BadRow("prompt", "missing", REASONS["missing"])
    raw = row["prompt"]
    if isinstance(raw, list):
        prompt = messages(raw, "prompt")
    else:
        prompt = [{"role": "user", "content": text(row, "prompt")}]
    if prompt[0]["role"] != "system":
        prompt = optional_system(row) + prompt
    check_prompt_order(prompt, "prompt")
    # A conversation-style answer repeats the prompt turns, without a separately given system.
    turns = prompt[1:] if optional_system(row) else prompt
    return distinct(Pair(prompt, answer(row, "chosen", turns), answer(row, "rejected", turns)))


def _conversation_pair(row: Mapping) -> Pair:
    """chosen and rejected are whole conversations sharing every turn but the last
    (Argilla dpo-mix, Capybara)."""
    chosen, rejected = (messages(row[f], f) if f in row else text(row, f) for f in ("chosen", "rejected"))
    for field, convo in (("chosen", chosen), ("rejected", rejected)):
        if convo[-1]["role"] != "assistant":
            raise BadRow(field, "not_assistant_last", REASONS["not_assistant_last"])
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("rejected", "different_prompts", REASONS["different_prompts"])
    prompt = chosen[:-1]
    if prompt and prompt[0]["role"] != "system":
        prompt = optional_system(row) + prompt
    check_prompt_order(prompt, "chosen")
    return distinct(Pair(prompt, chosen[-1]["content"], rejected[-1]["content"]))


def _question_pair(row: Mapping) -> Pair:
    """system / question / chosen / rejected (Orca DPO pairs)."""
    prompt = optional_system(row) + [{"role": "user", "content": text(row, "question")}]
    return distinct(Pair(prompt, answer(row, "chosen"), answer(row, "rejected")))


BUILTIN_FORMATS = (
    PreferenceFormat(
        "prompt",
        "prompt (text or messages), chosen, rejected (text or assistant message), optional system",
        lambda row: {"prompt", "chosen", "rejected"} <= row.keys(),
        _prompt_pair,
    ),
    PreferenceFormat(
        "conversation",
        "chosen, rejected: full conversations that share all but the last turn",
        lambda row: (
            {"chosen", "rejected"} <= row.keys()
            and not {"prompt", "question"} & row.keys()
            and isinstance(row["chosen"], list)
        ),
        _conversation_pair,
    ),
    PreferenceFormat(
        "question",
        "system (optional), question, chosen, rejected",
        lambda row: {"question", "chosen", "rejected"} <= row.keys(),
        _question_pair,
    ),
)


@hookimpl
def register_formats(register):
    for fmt in BUILTIN_FORMATS:
        register(fmt)


get_formats = registry.registered("register_formats", __name__)

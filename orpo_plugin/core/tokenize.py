"""A preference pair as token ids: the one tokenization that training, the export check and
serving all use, so a served score is computed on the ids the model was trained on.

The prompt is rendered with the chat template and the generation prompt; prompt and each answer
are tokenized separately, so the answer ids are exactly the answer (no BPE merge across the
boundary can move a token from one side to the other), and each answer ends with EOS once.
A tokenizer here is an HF tokenizer or anything with its small surface (a GGUF's own tokenizer
behind llama.cpp, for one): __call__, apply_chat_template, eos/bos tokens and ids.
"""

from __future__ import annotations

from orpo_plugin.core.formats import OrpoDataError

PAIR_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
NOTE = "orpo_note"
# Notes fit_pair leaves on a pair; DROPPED_* pairs never reach the loss.
TRUNCATED = "truncated"
DROPPED_PROMPT = "prompt longer than sequence_len"


def _strip_closing_eos(text: str, eos_token: str | None) -> str:
    """Rendered chat turns often end with '<eos>\n'; the EOS is appended as an id instead."""
    stripped = text.rstrip()
    if eos_token and stripped.endswith(eos_token):
        return stripped[: -len(eos_token)]
    return text


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text (Llama's BOS; nothing for Qwen2 or
    ChatML-only tokenizers): HF's own behaviour, whatever its config flags say."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return full[: full.index(plain[0])] if plain and plain[0] in full else []


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batched; the tokenizer's own prefix (BOS) once, not again when a chat template
    already wrote it into the text."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    prefix = special_prefix(tokenizer)
    if not prefix:
        return encoded
    return [ids if ids[: len(prefix)] == prefix else prefix + ids for ids in encoded]


def encode_responses(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batched; exactly the response's tokens, then EOS once."""
    eos = tokenizer.eos_token_id
    stripped = [_strip_closing_eos(t, tokenizer.eos_token) for t in texts]
    return [ids + [eos] for ids in tokenizer(stripped, add_special_tokens=False)["input_ids"]]


def render_prompt(tokenizer, template: str | None, messages: list[dict]) -> str:
    """The prompt as the model sees it: messages through the chat template, generation prompt on."""
    from jinja2 import TemplateError

    template = template or tokenizer.chat_template
    if not template:
        raise OrpoDataError(
            "the tokenizer has no chat template; set `chat_template:` (e.g. chatml, llama3) or "
            "`chat_template_jinja:` in the config, or score raw text"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except TemplateError as err:
        raise OrpoDataError(
            f"the chat template cannot render these messages ({err}); check that the chat template suits this tokenizer"
        ) from None


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None, bos=None):
    """Fit a pair into max_length tokens per sequence: returns (ids or None, note).
    A prompt longer than max_length is dropped. Otherwise, if prompt + the longer answer do not
    fit and the prompt takes more than half, keep the prompt's end (its leading BOS stays),
    then cut both answers to what is left, so each keeps at least one token."""
    note = ""
    if max_length and len(prompt) + max(len(chosen), len(rejected)) > max_length:
        if len(prompt) >= max_length:
            return None, DROPPED_PROMPT
        note = TRUNCATED
        keep = max_length // 2
        if len(prompt) > keep:
            head = prompt[:1] if bos is not None and prompt[:1] == [bos] else []
            prompt = head + prompt[len(prompt) - (keep - len(head)) :]
        budget = max_length - len(prompt)
        chosen, rejected = chosen[:budget], rejected[:budget]
    return {"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected}, note


def encode_pairs(batch: dict, tokenizer, max_length: int | None, template: str | None = None) -> dict:
    """Batched (the body of datasets.map(batched=True)): rows of prompt (a rendered string, or
    chat messages rendered here with `template`, default the tokenizer's), chosen and rejected
    strings -> PAIR_COLUMNS plus NOTE (empty, TRUNCATED or a DROPPED_* reason)."""
    texts = [p if isinstance(p, str) else render_prompt(tokenizer, template, p) for p in batch["prompt"]]
    prompts = encode_prompts(tokenizer, texts)
    chosen = encode_responses(tokenizer, batch["chosen"])
    rejected = encode_responses(tokenizer, batch["rejected"])
    out = {c: [] for c in (*PAIR_COLUMNS, NOTE)}
    for p, c, r in zip(prompts, chosen, rejected):
        ids, note = fit_pair(p, c, r, max_length, tokenizer.bos_token_id)
        for col in PAIR_COLUMNS:
            out[col].append(ids[col] if ids else [])
        out[NOTE].append(note)
    return out


def tokenize_pair(
    tokenizer,
    prompt: str | list[dict],
    chosen: str,
    rejected: str,
    max_length: int | None = None,
    template: str | None = None,
):
    """One pair: (ids dict or None, note)."""
    out = encode_pairs(
        {"prompt": [prompt], "chosen": [chosen], "rejected": [rejected]}, tokenizer, max_length, template
    )
    note = out[NOTE][0]
    return (None if note not in ("", TRUNCATED) else {c: out[c][0] for c in PAIR_COLUMNS}), note

"""Preference pairs as token ids, and the batches the trainer consumes.

Prompt and each response are tokenized separately, so the response ids are exactly the
response (no BPE merge across the boundary can move a token from one side to the other).
Each response ends with EOS exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
PAIR_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


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


# Notes fit_pair leaves on a pair; DROPPED_* pairs never reach the loss.
TRUNCATED = "truncated"
DROPPED_PROMPT = "prompt longer than sequence_len"


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
            prompt = head + prompt[len(prompt) - (keep - len(head)):]
        budget = max_length - len(prompt)
        chosen, rejected = chosen[:budget], rejected[:budget]
    return {"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected}, note


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int | None):
    """Token ids of one pair, or (None, reason) when it cannot be trained on within max_length."""
    [p], [c, r] = encode_prompts(tokenizer, [prompt]), encode_responses(tokenizer, [chosen, rejected])
    ids, note = fit_pair(p, c, r, max_length, tokenizer.bos_token_id)
    return ids, (note if ids is None else None)


def encode_string_pairs(batch, tokenizer, max_length):
    """datasets.map(batched=True) body for rows of prompt/chosen/rejected strings: PAIR_COLUMNS
    plus `orpo_note` (empty, TRUNCATED or a DROPPED_* reason)."""
    prompts = encode_prompts(tokenizer, batch["prompt"])
    chosen = encode_responses(tokenizer, batch["chosen"])
    rejected = encode_responses(tokenizer, batch["rejected"])
    out = {c: [] for c in (*PAIR_COLUMNS, "orpo_note")}
    for p, c, r in zip(prompts, chosen, rejected):
        ids, note = fit_pair(p, c, r, max_length, tokenizer.bos_token_id)
        for col in PAIR_COLUMNS:
            out[col].append(ids[col] if ids else [])
        out["orpo_note"].append(note)
    return out


def drop_unfit(tokenized, num_proc=None):
    """Remove dropped pairs; returns (dataset, Counter of notes over all pairs)."""
    from collections import Counter

    notes = Counter(tokenized["orpo_note"])
    kept = tokenized.filter(lambda n: n in ("", TRUNCATED), input_columns="orpo_note", num_proc=num_proc)
    return kept.remove_columns("orpo_note"), notes


def tokenize_dataset(dataset, tokenizer, max_length: int | None, num_proc: int | None = None):
    """Rows with string prompt/chosen/rejected (TRL's form, and what Axolotl's ORPO strategies
    produce) -> PAIR_COLUMNS; already tokenized datasets pass through. Returns (dataset,
    number of pairs dropped)."""
    if all(c in dataset.column_names for c in PAIR_COLUMNS):
        return dataset, 0
    tokenized = dataset.map(
        encode_string_pairs, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length}, desc="ORPO: tokenizing pairs",
    )
    kept, notes = drop_unfit(tokenized, num_proc)
    return kept, len(tokenized) - len(kept)


@dataclass
class PairCollator:
    """Chosen rows then rejected rows, right-padded: input_ids, attention_mask, and labels
    holding the response tokens (IGNORE_INDEX on prompt and padding)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows, labels = [], []
        for side in ("chosen_input_ids", "rejected_input_ids"):
            for f in features:
                prompt, response = list(f["prompt_input_ids"]), list(f[side])
                rows.append(prompt + response)
                labels.append([IGNORE_INDEX] * len(prompt) + response)
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labels)):
            input_ids[i, : len(r)] = torch.tensor(r)
            label_ids[i, : len(r)] = torch.tensor(lab)
            attention[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}

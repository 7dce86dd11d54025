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
    """Rendered chat turns often end with '<eos>\\n'; the EOS is appended as an id instead."""
    stripped = text.rstrip()
    if eos_token and stripped.endswith(eos_token):
        return stripped[: -len(eos_token)]
    return text


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", True) and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def encode_response(tokenizer, response: str) -> list[int]:
    text = _strip_closing_eos(response, tokenizer.eos_token)
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int | None):
    """Token ids of one pair, or (None, reason) when it cannot be trained on within max_length."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    chosen_ids = encode_response(tokenizer, chosen)
    rejected_ids = encode_response(tokenizer, rejected)
    if max_length:
        budget = max_length - len(prompt_ids)
        if budget < 1:
            return None, "prompt longer than sequence_len"
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    return {
        "prompt_input_ids": prompt_ids,
        "chosen_input_ids": chosen_ids,
        "rejected_input_ids": rejected_ids,
    }, None


def tokenize_dataset(dataset, tokenizer, max_length: int | None, num_proc: int | None = None):
    """Map rows with string prompt/chosen/rejected (TRL's form, also what Axolotl's ORPO
    strategies produce) to PAIR_COLUMNS; rows that cannot fit are dropped and counted."""
    if all(c in dataset.column_names for c in PAIR_COLUMNS):
        return dataset, 0

    def encode(batch):
        out = {c: [] for c in PAIR_COLUMNS}
        for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            ids, _ = tokenize_pair(tokenizer, p, c, r, max_length)
            for col in PAIR_COLUMNS:
                out[col].append(ids[col] if ids else [])
        return out

    tokenized = dataset.map(
        encode, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
        desc="ORPO: tokenizing pairs",
    )
    before = len(tokenized)
    tokenized = tokenized.filter(lambda row: len(row["chosen_input_ids"]) > 0, num_proc=num_proc)
    return tokenized, before - len(tokenized)


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

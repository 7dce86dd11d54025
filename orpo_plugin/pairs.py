"""Preference pairs as token ids, and the batches the trainer consumes.

Prompt and each response are tokenized separately, so the response ids are exactly the
response (no BPE merge across the boundary can move a token from one side to the other).
Each response ends with EOS exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    kept, _ = drop_unfit(tokenized, num_proc)
    return kept, len(tokenized) - len(kept)


# Kinds of scored target: prompt tokens count only in the NLL with train_on_inputs.
PROMPT, CHOSEN, REJECTED = 0, 1, 2
SCORE_KEYS = ("score_row", "score_pos", "score_target", "score_pair", "score_kind")


class _Scores:
    """The scored next-token targets of a batch: hidden state at (row, pos) predicts target."""

    def __init__(self):
        self.columns = {k: [] for k in SCORE_KEYS}

    def add(self, row: int, positions, targets, pair: int, kind: int) -> None:
        positions, targets = list(positions), list(targets)
        for key, values in (("score_row", [row] * len(targets)), ("score_pos", positions),
                            ("score_target", targets), ("score_pair", [pair] * len(targets)),
                            ("score_kind", [kind] * len(targets))):
            self.columns[key].extend(values)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.long) for k, v in self.columns.items()}


def _pad_rows(rows: list[list[int]], value: int, multiple: int | None) -> torch.Tensor:
    width = max(len(r) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


@dataclass
class PairCollator:
    """Unshared layout: chosen rows then rejected rows, each [prompt][answer], right-padded;
    the prompt is computed twice (as TRL does). 2-D attention_mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows, scores = [], _Scores()
        for side, kind, offset in (("chosen_input_ids", CHOSEN, 0), ("rejected_input_ids", REJECTED, len(features))):
            for i, f in enumerate(features):
                prompt, answer = list(f["prompt_input_ids"]), list(f[side])
                rows.append(prompt + answer)
                if kind == CHOSEN:
                    scores.add(offset + i, range(len(prompt) - 1), prompt[1:], i, PROMPT)
                scores.add(offset + i, range(len(prompt) - 1, len(prompt) + len(answer) - 1), answer, i, kind)
        input_ids = _pad_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
        attention = _pad_rows([[1] * len(r) for r in rows], 0, self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": attention, **scores.tensors()}


@dataclass
class SharedPairCollator:
    """Prefix-shared layout (Wang & Hegde 2024): one sequence [prompt][chosen][rejected] per
    pair; rejected tokens see the prompt but not the chosen answer, and their positions restart
    where the prompt ends. With packing, several pairs share a row up to max_length tokens with
    no attention across pairs. attention_mask is boolean [rows, 1, T, T] (True = may attend)."""

    pad_token_id: int
    max_length: int
    packing: bool = True
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows: list[list[dict]] = []  # each row: the pairs packed into it (first fit)
        for i, f in enumerate(features):
            unit = {"pair": i, "prompt": list(f["prompt_input_ids"]), "chosen": list(f["chosen_input_ids"]),
                    "rejected": list(f["rejected_input_ids"])}
            unit["size"] = sum(len(unit[k]) for k in ("prompt", "chosen", "rejected"))
            fits = [r for r in rows if sum(u["size"] for u in r) + unit["size"] <= self.max_length]
            if self.packing and fits:
                fits[0].append(unit)
            else:
                rows.append([unit])

        scores, tokens, positions, pair_of, part_of = _Scores(), [], [], [], []
        for r, units in enumerate(rows):
            ids, pos, pair_ids, parts = [], [], [], []
            for u in units:
                o, p, c, rej = len(ids), u["prompt"], u["chosen"], u["rejected"]
                ids += p + c + rej
                pos += list(range(len(p))) + list(range(len(p), len(p) + len(c))) + list(range(len(p), len(p) + len(rej)))
                pair_ids += [u["pair"]] * (len(p) + len(c) + len(rej))
                parts += [PROMPT] * len(p) + [CHOSEN] * len(c) + [REJECTED] * len(rej)
                last_prompt = o + len(p) - 1
                scores.add(r, range(o, last_prompt), p[1:], u["pair"], PROMPT)
                scores.add(r, [last_prompt] + list(range(o + len(p), o + len(p) + len(c) - 1)), c, u["pair"], CHOSEN)
                start = o + len(p) + len(c)
                scores.add(r, [last_prompt] + list(range(start, start + len(rej) - 1)), rej, u["pair"], REJECTED)
            tokens.append(ids)
            positions.append(pos)
            pair_of.append(pair_ids)
            part_of.append(parts)

        input_ids = _pad_rows(tokens, self.pad_token_id, self.pad_to_multiple_of)
        width = input_ids.shape[1]
        position_ids = _pad_rows(positions, 0, self.pad_to_multiple_of)
        pair = _pad_rows(pair_of, -1, self.pad_to_multiple_of)  # padding: pair -1, sees only padding
        part = _pad_rows(part_of, PROMPT, self.pad_to_multiple_of)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same_pair = pair[:, :, None] == pair[:, None, :]
        rejected_sees_chosen = (part[:, :, None] == REJECTED) & (part[:, None, :] == CHOSEN)
        mask = causal & same_pair & ~rejected_sees_chosen
        return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask[:, None],
                **scores.tensors()}

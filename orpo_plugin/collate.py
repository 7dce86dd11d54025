"""Collated batches of tokenized pairs (core.tokenize makes the ids): the two layouts the trainer
consumes, and the scored next-token targets each carries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Kinds of scored target: prompt tokens count only in the NLL with train_on_inputs.
PROMPT, CHOSEN, REJECTED = 0, 1, 2
SCORE_KEYS = ("score_row", "score_pos", "score_target", "score_pair", "score_kind")


class _Scores:
    """The scored next-token targets of a batch: hidden state at (row, pos) predicts target."""

    def __init__(self):
        self.columns = {k: [] for k in SCORE_KEYS}

    def add(self, row: int, positions, targets, pair: int, kind: int) -> None:
        positions, targets = list(positions), list(targets)
        for key, values in (
            ("score_row", [row] * len(targets)),
            ("score_pos", positions),
            ("score_target", targets),
            ("score_pair", [pair] * len(targets)),
            ("score_kind", [kind] * len(targets)),
        ):
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
            unit = {
                "pair": i,
                "prompt": list(f["prompt_input_ids"]),
                "chosen": list(f["chosen_input_ids"]),
                "rejected": list(f["rejected_input_ids"]),
            }
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
                pos += (
                    list(range(len(p))) + list(range(len(p), len(p) + len(c))) + list(range(len(p), len(p) + len(rej)))
                )
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
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": mask[:, None],
            **scores.tensors(),
        }

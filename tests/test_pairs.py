"""Pair tokenization (exact response ids, one EOS, no doubled BOS) and collation."""

from __future__ import annotations

import pytest
from datasets import Dataset

from orpo_plugin.collate import CHOSEN, PROMPT, REJECTED, PairCollator, SharedPairCollator
from orpo_plugin.core.tokenize import DROPPED_PROMPT, tokenize_pair
from orpo_plugin.datasets import tokenize_dataset


def test_response_ids_are_exactly_the_response_then_one_eos(tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    ids, reason = tokenize_pair(tokenizer, prompt, "2 + 3 = 5", "2 + 3 = 6", max_length=None)
    assert reason == ""
    eos = tokenizer.eos_token_id
    assert ids["prompt_input_ids"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids["chosen_input_ids"] == tokenizer("2 + 3 = 5", add_special_tokens=False)["input_ids"] + [eos]
    assert ids["rejected_input_ids"][-1] == eos and ids["rejected_input_ids"].count(eos) == 1


def test_rendered_turn_ending_keeps_a_single_eos(tokenizer):
    """Axolotl's chat_template.argilla hands over 'answer<|im_end|>\\n': EOS must not double."""
    eos = tokenizer.eos_token_id
    ids, _ = tokenize_pair(tokenizer, "Q", "answer<|im_end|>\n", "other<|im_end|>", None)
    assert ids["chosen_input_ids"] == tokenizer("answer", add_special_tokens=False)["input_ids"] + [eos]
    assert ids["rejected_input_ids"].count(eos) == 1


def test_bos_is_added_once():
    """A Llama-style tokenizer (it adds BOS itself): one BOS, also when the text has one."""
    import tiny

    tok = tiny.build_tokenizer(None, bos_token="<|endoftext|>")
    plain, _ = tokenize_pair(tok, "Hello", "a", "b", None)
    already, _ = tokenize_pair(tok, "<|endoftext|>Hello", "a", "b", None)
    assert plain["prompt_input_ids"][0] == tok.bos_token_id
    assert plain["prompt_input_ids"].count(tok.bos_token_id) == 1
    assert already["prompt_input_ids"] == plain["prompt_input_ids"]
    assert plain["chosen_input_ids"].count(tok.bos_token_id) == 0


def test_truncation_cuts_responses_and_drops_prompts_that_fill_the_budget(tokenizer):
    long_answer = "one two three four five six seven eight nine ten"
    ids, _ = tokenize_pair(tokenizer, "Question here", long_answer, "short", max_length=6)
    prompt_len = len(ids["prompt_input_ids"])
    assert len(ids["chosen_input_ids"]) == 6 - prompt_len >= 1
    assert len(ids["rejected_input_ids"]) <= 6 - prompt_len
    dropped, reason = tokenize_pair(tokenizer, "a much longer question than the budget allows", "x", "y", 4)
    assert dropped is None and "sequence_len" in reason

    ds = Dataset.from_list(
        [
            {"prompt": "Question here", "chosen": long_answer, "rejected": "short"},
            {"prompt": "a much longer question than the budget", "chosen": "x", "rejected": "y"},
        ]
    )
    tokenized, notes = tokenize_dataset(ds, tokenizer, max_length=6)
    assert notes[DROPPED_PROMPT] == 1 and len(tokenized) == 1
    assert all(len(r) > 0 for r in tokenized["rejected_input_ids"])


def _scored(batch, kind):
    """(row, position, target) triples of one kind, in order."""
    keep = batch["score_kind"] == kind
    return list(
        zip(batch["score_row"][keep].tolist(), batch["score_pos"][keep].tolist(), batch["score_target"][keep].tolist())
    )


FEATURES = [
    {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 2], "rejected_input_ids": [9, 9, 9, 2]},
    {"prompt_input_ids": [5], "chosen_input_ids": [3, 2], "rejected_input_ids": [2]},
]


@pytest.mark.parametrize("multiple", [None, 8])
def test_unshared_layout(multiple):
    batch = PairCollator(pad_token_id=0, pad_to_multiple_of=multiple)(FEATURES)
    width = 7 if multiple is None else 8
    assert batch["input_ids"].shape == (4, width)
    assert batch["input_ids"][0, :5].tolist() == [5, 6, 7, 8, 2]  # chosen rows first
    assert batch["input_ids"][2, :7].tolist() == [5, 6, 7, 9, 9, 9, 2]  # then rejected
    assert batch["attention_mask"].sum(1).tolist() == [5, 3, 7, 2]
    assert _scored(batch, CHOSEN) == [(0, 2, 8), (0, 3, 2), (1, 0, 3), (1, 1, 2)]
    assert _scored(batch, REJECTED) == [(2, 2, 9), (2, 3, 9), (2, 4, 9), (2, 5, 2), (3, 0, 2)]
    assert _scored(batch, PROMPT) == [(0, 0, 6), (0, 1, 7)]  # used only with train_on_inputs
    assert batch["score_pair"].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("packing", [True, False])
def test_prefix_shared_layout(packing):
    batch = SharedPairCollator(pad_token_id=0, max_length=16, packing=packing)(FEATURES)
    first = [5, 6, 7, 8, 2, 9, 9, 9, 2]
    if packing:  # both pairs in one row: 9 + 4 tokens
        assert batch["input_ids"].tolist() == [first + [5, 3, 2, 2]]
        assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 6] + [0, 1, 2, 1]]
    else:
        assert batch["input_ids"].tolist() == [first, [5, 3, 2, 2, 0, 0, 0, 0, 0]]
        assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]
    # chosen targets read from the last prompt token, then from chosen tokens
    assert _scored(batch, CHOSEN)[:2] == [(0, 2, 8), (0, 3, 2)]
    # rejected targets: first from the last prompt token too, then from rejected tokens
    assert _scored(batch, REJECTED)[:4] == [(0, 2, 9), (0, 5, 9), (0, 6, 9), (0, 7, 2)]
    mask = batch["attention_mask"][0, 0]
    assert mask[5, :3].all() and not mask[5, 3:5].any() and mask[5, 5]  # rejected sees prompt, not chosen
    assert mask[4, :5].all() and not mask[4, 5:].any()  # chosen is plainly causal
    if packing:
        assert not mask[9:, :9].any() and mask[12, 9] and not mask[12, 10]  # no attention across pairs
    else:
        padded = batch["attention_mask"][1, 0]
        assert not padded[4:, :4].any() and padded[4, 4]  # padding sees only padding, never a NaN row


def test_packing_respects_max_length():
    batch = SharedPairCollator(pad_token_id=0, max_length=10, packing=True)(FEATURES * 2)
    # sizes 9, 4, 9, 4 into rows of 10, first fit: [9], [4, 4], [9]
    assert batch["input_ids"].shape == (3, 9)
    assert batch["attention_mask"].shape == (3, 1, 9, 9)
    assert sorted(set(batch["score_row"][batch["score_pair"] == p].tolist()).pop() for p in range(4)) == [0, 1, 1, 2]

"""Pair tokenization (exact response ids, one EOS, no doubled BOS) and collation."""

from __future__ import annotations

import pytest
from datasets import Dataset

from orpo_plugin.pairs import IGNORE_INDEX, PairCollator, tokenize_dataset, tokenize_pair


def test_response_ids_are_exactly_the_response_then_one_eos(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids, reason = tokenize_pair(tokenizer, prompt, "2 + 3 = 5", "2 + 3 = 6", max_length=None)
    assert reason is None
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
    from orpo_plugin import tiny

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

    ds = Dataset.from_list([{"prompt": "Question here", "chosen": long_answer, "rejected": "short"},
                            {"prompt": "a much longer question than the budget", "chosen": "x", "rejected": "y"}])
    tokenized, n_dropped = tokenize_dataset(ds, tokenizer, max_length=6)
    assert n_dropped == 1 and len(tokenized) == 1
    assert all(len(r) > 0 for r in tokenized["rejected_input_ids"])


@pytest.mark.parametrize("multiple", [None, 8])
def test_collator_layout(multiple):
    features = [
        {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 2], "rejected_input_ids": [9, 9, 9, 2]},
        {"prompt_input_ids": [5], "chosen_input_ids": [3, 2], "rejected_input_ids": [2]},
    ]
    batch = PairCollator(pad_token_id=0, pad_to_multiple_of=multiple)(features)
    width = 7 if multiple is None else 8
    assert batch["input_ids"].shape == (4, width)
    assert batch["input_ids"][0, :5].tolist() == [5, 6, 7, 8, 2]      # chosen rows first
    assert batch["input_ids"][2, :7].tolist() == [5, 6, 7, 9, 9, 9, 2]  # then rejected
    assert batch["labels"][0, :5].tolist() == [IGNORE_INDEX] * 3 + [8, 2]
    assert batch["labels"][3].tolist()[:2] == [IGNORE_INDEX, 2]
    assert batch["attention_mask"].sum(1).tolist() == [5, 3, 7, 2]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()

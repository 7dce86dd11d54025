"""The preference-data pipeline: golden tokens per format, the bad-row matrix in both modes,
format detection, column mapping, truncation reporting."""

from __future__ import annotations

import json

import pytest
from axolotl.utils.dict import DictDefault

from orpo_plugin.collate import CHOSEN, REJECTED, PairCollator
from orpo_plugin.core.formats import REASONS, OrpoDataError, get_formats
from orpo_plugin.core.rows import DatasetReport, normalize_rows
from orpo_plugin.datasets import prepare_split, split_field_maps

SYSTEM, QUESTION, GOOD, BAD = "Be brief.", "What is 2 + 3?", "2 + 3 = 5", "2 + 3 = 6"
USER = {"role": "user", "content": QUESTION}
ROWS_BY_FORMAT = {
    "prompt (strings)": {"system": SYSTEM, "prompt": QUESTION, "chosen": GOOD, "rejected": BAD},
    "prompt (messages)": {
        "prompt": [{"role": "system", "content": SYSTEM}, USER],
        "chosen": [{"role": "assistant", "content": GOOD}],
        "rejected": BAD,
    },
    "prompt (one assistant message each)": {
        "prompt": [{"role": "system", "content": SYSTEM}, USER],
        "chosen": {"role": "assistant", "content": GOOD},
        "rejected": {"role": "assistant", "content": BAD},
    },
    "ultrafeedback": {
        "system": SYSTEM,
        "prompt": QUESTION,
        "chosen": [USER, {"role": "assistant", "content": GOOD}],
        "rejected": [USER, {"role": "assistant", "content": BAD}],
    },
    "conversation": {
        "chosen": [{"role": "system", "content": SYSTEM}, USER, {"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "system", "content": SYSTEM}, USER, {"role": "assistant", "content": BAD}],
    },
    "question": {"system": SYSTEM, "question": QUESTION, "chosen": GOOD, "rejected": BAD},
    "mapped columns": {"sys": SYSTEM, "instruction": QUESTION, "good": GOOD, "bad": BAD},
}
FIELD_MAP = {"system": "sys", "prompt": "instruction", "chosen": "good", "rejected": "bad"}
# What every one of the rows above must become, written out: ChatML with the generation prompt.
GOLDEN_PROMPT = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
)


def _cfg(tmp_path, rows, on_bad_row="error", field_map=None, sequence_len=256, **entry):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    raw = {
        "datasets": [
            dict(
                {"path": str(data), "ds_type": "json", "type": "orpo_plugin.preference"},
                **{f"field_{k}": v for k, v in (field_map or {}).items()},
                **entry,
            )
        ],
        "sequence_len": sequence_len,
        "orpo_on_bad_row": on_bad_row,
    }
    split_field_maps(raw)  # what the plugin's register() does before validation
    return DictDefault(raw)


@pytest.mark.parametrize("name", list(ROWS_BY_FORMAT))
def test_golden_tokens_for_each_format(name, tmp_path, tokenizer):
    cfg = _cfg(tmp_path, [ROWS_BY_FORMAT[name]], field_map=FIELD_MAP if name == "mapped columns" else None)
    pairs = prepare_split(cfg, tokenizer, "datasets")
    assert len(pairs) == 1
    row = pairs[0]
    eos = tokenizer.eos_token_id
    assert tokenizer.decode(row["prompt_input_ids"]) == GOLDEN_PROMPT
    assert row["prompt_input_ids"] == tokenizer(GOLDEN_PROMPT, add_special_tokens=False)["input_ids"]
    assert row["chosen_input_ids"] == tokenizer(GOOD, add_special_tokens=False)["input_ids"] + [eos]
    assert row["rejected_input_ids"] == tokenizer(BAD, add_special_tokens=False)["input_ids"] + [eos]
    batch = PairCollator(tokenizer.pad_token_id)([row])
    n_prompt, kind = len(row["prompt_input_ids"]), batch["score_kind"]
    assert batch["score_target"][kind == CHOSEN].tolist() == row["chosen_input_ids"]
    assert batch["score_pos"][kind == CHOSEN].tolist() == list(
        range(n_prompt - 1, n_prompt - 1 + len(row["chosen_input_ids"]))
    )
    assert batch["score_target"][kind == REJECTED].tolist() == row["rejected_input_ids"]


def test_multi_turn_history_is_kept_in_the_prompt(tmp_path, tokenizer):
    history = [USER, {"role": "assistant", "content": "5"}, {"role": "user", "content": "And times 2?"}]
    cfg = _cfg(tmp_path, [{"prompt": history, "chosen": "10", "rejected": "7"}])
    row = prepare_split(cfg, tokenizer, "datasets")[0]
    assert tokenizer.decode(row["prompt_input_ids"]) == tokenizer.apply_chat_template(
        history, tokenize=False, add_generation_prompt=True
    )


def _conv(*turns):
    return [{"role": r, "content": c} for r, c in turns]


VALID = {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD}
# (row, reason code, field named in the error)
BAD_ROWS = [
    ({"prompt": QUESTION, "rejected": BAD}, "missing", "chosen"),
    ({**VALID, "chosen": None}, "null", "chosen"),
    ({**VALID, "rejected": "  \n "}, "empty", "rejected"),
    ({**VALID, "prompt": 42}, "not_string", "prompt"),
    ({**VALID, "rejected": GOOD}, "identical", "rejected"),
    ({**VALID, "prompt": _conv(("user", "Hi"), ("assistant", "Hello"))}, "role_order", "prompt"),
    ({**VALID, "prompt": _conv(("assistant", "Hi"), ("user", "Q"))}, "role_order", "prompt"),
    ({**VALID, "prompt": _conv(("robot", "Hi"))}, "unknown_role", "prompt[0].role"),
    ({**VALID, "chosen": _conv(("user", "Other question"), ("assistant", GOOD))}, "different_prompts", "chosen"),
    ({**VALID, "chosen": _conv(("user", QUESTION))}, "not_assistant_last", "chosen"),
    ('{"prompt": "unterminated', "invalid_json", "(line)"),
]


@pytest.mark.parametrize("row,reason,field", BAD_ROWS, ids=[r for _, r, _ in BAD_ROWS])
def test_bad_row_stops_with_dataset_row_field_reason_and_the_fix(row, reason, field, tmp_path, tokenizer):
    cfg = _cfg(tmp_path, [VALID, row, VALID])
    with pytest.raises(OrpoDataError) as err:
        prepare_split(cfg, tokenizer, "datasets")
    message = str(err.value)
    assert str(tmp_path / "prefs.jsonl") in message
    assert "row 1 (line 2)" in message
    assert f"field '{field}'" in message
    assert "orpo_on_bad_row: skip" in message


@pytest.mark.parametrize("row,reason,field", BAD_ROWS, ids=[r for _, r, _ in BAD_ROWS])
def test_bad_row_is_skipped_and_counted(row, reason, field, tmp_path, tokenizer, caplog):
    cfg = _cfg(tmp_path, [VALID, row, {**VALID, "chosen": "2 + 3 = 5."}], on_bad_row="skip")
    caplog.set_level("INFO")
    pairs = prepare_split(cfg, tokenizer, "datasets")
    assert len(pairs) == 2
    summary = caplog.text
    assert f"{REASONS[reason]}: 1" in summary and "3 rows -> 2 pairs" in summary


def test_conversation_rows_that_disagree_on_the_prompt(tmp_path, tokenizer):
    row = {
        "chosen": _conv(("user", "A?"), ("assistant", "yes")),
        "rejected": _conv(("user", "B?"), ("assistant", "no")),
    }
    with pytest.raises(OrpoDataError, match=r"row 0 \(line 1\): field 'rejected': .*different prompts"):
        prepare_split(_cfg(tmp_path, [row]), tokenizer, "datasets")
    tail = {"chosen": _conv(("user", "A?"), ("assistant", "yes")), "rejected": _conv(("user", "A?"), ("user", "no"))}
    with pytest.raises(OrpoDataError, match="does not end in an assistant turn"):
        prepare_split(_cfg(tmp_path, [tail]), tokenizer, "datasets")


def test_unknown_and_ambiguous_shapes_list_what_was_found_and_what_is_accepted(tmp_path, tokenizer):
    with pytest.raises(OrpoDataError) as err:
        prepare_split(_cfg(tmp_path, [{"instruction": "x", "good": "a", "bad": "b"}]), tokenizer, "datasets")
    text = str(err.value)
    assert "columns found: bad, good, instruction" in text
    for name in get_formats():
        assert f"- {name}:" in text
    assert "field_prompt" in text
    with pytest.raises(OrpoDataError, match="several formats"):
        prepare_split(
            _cfg(tmp_path, [{"prompt": "p", "question": "q", "chosen": "a", "rejected": "b"}]), tokenizer, "datasets"
        )


@pytest.mark.parametrize(
    "first",
    [{"prompt": "Q", "chosen": "a"}, {"prompt": "p", "question": "q", "chosen": "a", "rejected": "b"}, "{not json"],
    ids=["no-format", "two-formats", "invalid-json"],
)
def test_a_bad_first_row_is_one_bad_row(first, tmp_path, tokenizer, caplog):
    """Format detection survives bad rows: a first row of no shape, of two shapes, or not JSON
    is skipped and counted under skip, and named by its row under error."""
    rows = [first, VALID, {**VALID, "chosen": "2 + 3 = 5."}]
    caplog.set_level("INFO")
    pairs = prepare_split(_cfg(tmp_path, rows, on_bad_row="skip"), tokenizer, "datasets")
    assert len(pairs) == 2 and "3 rows -> 2 pairs; skipped 1 bad rows" in caplog.text
    with pytest.raises(OrpoDataError, match=r"prefs.jsonl row 0 \(line 1\): field '\((columns|line)\)'"):
        prepare_split(_cfg(tmp_path, rows), tokenizer, "datasets")


def test_truncation_keeps_the_prompt_end_and_counts_drops(tmp_path, tokenizer, caplog):
    long_prompt = " ".join(f"word{i}" for i in range(12))  # 35 tokens rendered: more than half of 48
    rows = [
        {"prompt": long_prompt, "chosen": "one two three four five six seven eight", "rejected": "no"},
        {"prompt": long_prompt * 4, "chosen": "a", "rejected": "b"},
        VALID,
    ]
    caplog.set_level("INFO")
    pairs = prepare_split(_cfg(tmp_path, rows, sequence_len=48), tokenizer, "datasets")
    assert len(pairs) == 2
    first = pairs[0]
    assert len(first["prompt_input_ids"]) + len(first["chosen_input_ids"]) == 48
    assert len(first["prompt_input_ids"]) == 24  # cut to half the budget...
    assert tokenizer.decode(first["prompt_input_ids"]).endswith("<|im_start|>assistant\n")  # ...from its start
    assert len(first["rejected_input_ids"]) >= 1
    assert "dropped 1 (prompt longer than sequence_len)" in caplog.text
    assert "truncated 1 to sequence_len" in caplog.text


def test_skip_mode_with_nothing_left_is_an_error(tmp_path, tokenizer):
    with pytest.raises(OrpoDataError, match="no usable pairs"):
        prepare_split(_cfg(tmp_path, [{**VALID, "rejected": GOOD}], on_bad_row="skip"), tokenizer, "datasets")


def test_field_keys_move_out_of_only_our_entries():
    raw = {
        "datasets": [
            {"path": "a", "type": "orpo_plugin.preference", "field_prompt": "q", "field_chosen": "g"},
            {"path": "b", "type": "chat_template.argilla", "field_messages": "m"},
        ]
    }
    split_field_maps(raw)
    assert raw["orpo_field_maps"]["datasets"] == [{"prompt": "q", "chosen": "g"}, {}]
    assert "field_prompt" not in raw["datasets"][0] and raw["datasets"][1]["field_messages"] == "m"


def test_normalize_reports_format_and_counts():
    rows = [("row 0", VALID), ("row 1", {**VALID, "chosen": ""})]
    report = DatasetReport("mem")
    pairs = normalize_rows(rows, get_formats(), {}, "mem", "skip", report)
    assert len(pairs) == 1 and report.format == "prompt" and report.skipped == {"empty": 1}


def test_strategy_resolves_under_axolotls_own_loader_for_rl_orpo(tmp_path, model_dirs, tokenizer, fresh_plugins):
    """`type: orpo_plugin.preference` with Axolotl's built-in `rl: orpo` (TRL's trainer): Axolotl
    resolves <module>.<function>, and the rows become TRL's prompt/chosen/rejected strings."""
    from axolotl.utils.data.rl import _load_split
    from helpers import make_cfg

    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(ROWS_BY_FORMAT["conversation"]) + "\n" + json.dumps(ROWS_BY_FORMAT["question"]) + "\n")
    cfg = make_cfg(
        model_dirs["llama"],
        tmp_path / "out",
        rl="orpo",
        datasets=[{"path": str(data), "ds_type": "json", "type": "orpo_plugin.preference"}],
    )
    cfg.is_preprocess = True
    rows = _load_split(cfg, "train")
    assert sorted(rows.column_names) == ["chosen", "prompt", "rejected"]
    assert rows[0] == {"prompt": GOLDEN_PROMPT, "chosen": GOOD, "rejected": BAD}
    assert rows[1] == rows[0]


def test_axolotls_chat_template_setting_overrides_the_tokenizers(tmp_path, tokenizer):
    import tiny

    bos_tokenizer = tiny.build_tokenizer(None, bos_token="<|endoftext|>")  # llama3's template writes BOS
    cfg = _cfg(tmp_path, [ROWS_BY_FORMAT["question"]])
    cfg.chat_template = "llama3"
    row = prepare_split(cfg, bos_tokenizer, "datasets")[0]
    prompt = bos_tokenizer.decode(row["prompt_input_ids"])
    assert prompt.startswith("<|endoftext|><|start_header_id|>system<|end_header_id|>")
    assert row["prompt_input_ids"].count(bos_tokenizer.bos_token_id) == 1
    assert SYSTEM in prompt and prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(OrpoDataError, match=r"chat template cannot render.*bos_token"):
        prepare_split(cfg, tokenizer, "datasets")  # no BOS at all: a clear error, not a jinja trace

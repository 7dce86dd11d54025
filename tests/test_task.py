"""The demo's task (orpo_demo/task.py): disjoint topics, pairs built as documented from the base
model's recorded replies, and the two measures on hand-written replies."""

from __future__ import annotations

import json

import pytest

from orpo_demo import task
from orpo_plugin.core.rows import load_pairs


def test_training_and_held_out_questions_come_from_disjoint_topics():
    train, held_out = task.facts("train"), task.facts("held-out")
    assert {f.topic for f in train}.isdisjoint({f.topic for f in held_out})
    assert {f.question for f in train}.isdisjoint({f.question for f in held_out})
    facts = task.all_facts()
    assert len(train) + len(held_out) == len(facts) and len({f.question for f in facts}) == len(facts)


def test_every_chosen_answer_is_one_short_sentence_that_knows_its_fact():
    for fact in task.all_facts():
        assert task.shows_behaviour(fact.answer, finished=True), fact.answer
        assert task.knows(fact.answer, fact), fact


@pytest.mark.parametrize(
    "reply, finished, short",
    [
        ("The capital of France is Paris.", True, True),
        ("The capital of France is Paris.", False, False),  # cut by the token limit: it did not end
        ("Paris. It is also the largest city.", True, False),
        ("The Harry Potter books were written by J.K. Rowling.", True, True),  # initials end no sentence
        ("It is Paris!", True, True),
        (
            "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
            "seventeen eighteen nineteen twenty twentyone.",
            True,
            False,
        ),
        ("   ", True, False),
    ],
)
def test_short_answers_are_one_finished_sentence_of_at_most_twenty_words(reply, finished, short):
    assert task.shows_behaviour(reply, finished) is short


@pytest.mark.parametrize(
    "reply, knows",
    [
        ("The chemical symbol for gold is Au.", True),
        ("The chemical symbol for gold is au", True),
        ("Gold is found in Australia.", False),  # a key inside another word does not count
        ("The symbol is Ag.", False),
    ],
)
def test_knowledge_is_a_key_as_a_whole_word(reply, knows):
    gold = next(f for f in task.all_facts() if f.question == "What is the chemical symbol for gold?")
    assert task.knows(reply, gold) is knows


def test_pairs_reject_the_base_models_own_reply_cut_to_whole_sentences(tmp_path):
    recorded = task.base_replies()
    assert set(recorded) == {f.question for f in task.all_facts()}
    written = task.write_data(tmp_path)
    for split, path in written.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        by_question = {r["prompt"][0]["content"]: r for r in rows}
        for fact in task.facts(split):
            reply = recorded[fact.question]
            finished = reply["finish_reason"] == "stop"
            if task.shows_behaviour(reply["reply"], finished):
                assert fact.question not in by_question  # nothing to prefer
                continue
            row = by_question[fact.question]
            assert row["chosen"] == fact.answer and reply["reply"].startswith(row["rejected"])
            assert row["rejected"] == reply["reply"] or row["rejected"].rstrip()[-1] in ".!?"
        assert len(load_pairs(path)) == len(rows)  # every row reads as a training pair
    assert len(rows) >= 30  # held-out pairs enough to measure 0.9


def test_the_task_cli_writes_both_files(tmp_path, capsys):
    task.main(["--write", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "train.jsonl"]
    assert "held-out" in capsys.readouterr().out

"""The demo's preference task on SmolLM2-135M-Instruct: answer a factual question in one short
sentence instead of a ramble.

Asked "What is the largest planet in our solar system?", the base model answers "The largest
planet in our solar system is Neptune, but it's actually Uranus. Neptune is the eighth planet
from the Sun and ...". The preferred answer is "The largest planet in our solar system is
Jupiter." Each pair's rejected answer is the base model's own greedy reply to the question
(orpo_demo/data/base_replies.jsonl), so the pairs are what a user would collect: their model's
habit against the answer they want. Where the base's reply is already one short sentence there
is nothing to prefer, and the question makes no pair. The chosen answer is also right where the
base's reply is wrong, as in real preference data.

Everything is measured without a judge model:
- preference accuracy on held-out pairs (the chosen answer's mean log-prob above the rejected's);
- the behaviour: a greedy reply that is one sentence of at most MAX_WORDS words and ends (EOS)
  before the token limit;
- knowledge: the reply names the right answer (one of the fact's keys, as a whole word).

The facts (topic, question, preferred answer, keys) are orpo_demo/data/facts.jsonl. Training
questions and held-out questions come from disjoint topics (TRAIN_TOPICS and HELD_OUT_TOPICS).

    python -m orpo_demo.task --regenerate     # rewrite data/base_replies.jsonl from the base GGUF
    python -m orpo_demo.task --write DIR      # DIR/train.jsonl, DIR/eval.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from orpo_plugin.core.atomic import write_text


@dataclass(frozen=True)
class Fact:
    topic: str
    question: str
    answer: str  # the preferred reply: one short sentence
    keys: tuple[str, ...]  # a reply that contains one of these (a whole word, any case) knows the fact


FACTS_FILE = "facts.jsonl"  # one {topic, question, answer, keys} per line, in orpo_demo/data


@functools.cache
def all_facts() -> tuple[Fact, ...]:
    text = resources.files("orpo_demo").joinpath("data", FACTS_FILE).read_text(encoding="utf-8")
    return tuple(
        Fact(r["topic"], r["question"], r["answer"], tuple(r["keys"])) for r in map(json.loads, text.splitlines())
    )


TRAIN_TOPICS = ("capitals", "animals", "food and daily life", "sports and games", "shapes and numbers", "weather")
HELD_OUT_TOPICS = ("space", "science", "history and literature", "geography")
MAX_WORDS = 20
# How the base replies were generated (--regenerate), and how the demo asks every model: greedy.
GENERATION = {"max_tokens": 48, "temperature": 0.0, "n_ctx": 512}
BASE_REPLIES = "base_replies.jsonl"

# A sentence ends at . ! or ? before a space or the end, except after a lone capital (J.K. Rowling).
_SENTENCE_END = re.compile(r"(?<!\b[A-Z])[.!?](?=\s|$)")


def facts(split: str) -> list[Fact]:
    """ "train" or "held-out"."""
    topics = {"train": TRAIN_TOPICS, "held-out": HELD_OUT_TOPICS}[split]
    return [f for f in all_facts() if f.topic in topics]


def shows_behaviour(reply: str, finished: bool) -> bool:
    """One short sentence: the reply ended (EOS, not the token limit), has at most one sentence end
    and at most MAX_WORDS words."""
    text = reply.strip()
    return finished and bool(text) and len(_SENTENCE_END.findall(text)) <= 1 and len(text.split()) <= MAX_WORDS


def knows(reply: str, fact: Fact) -> bool:
    """The reply names the right answer: one of the fact's keys as a whole word, in any case."""
    return any(re.search(rf"(?<!\w){re.escape(key)}(?!\w)", reply, re.IGNORECASE) for key in fact.keys)


@functools.cache
def base_replies() -> dict[str, dict]:
    """question -> {"reply", "finish_reason"}: the base model's greedy replies (data/base_replies.jsonl)."""
    text = resources.files("orpo_demo").joinpath("data", BASE_REPLIES).read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    return {row["question"]: row for row in rows}


def whole_sentences(reply: str) -> str:
    """A reply the token limit cut, up to its last complete sentence (all of it if it has none)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(reply)]
    return reply[: ends[-1]] if ends else reply


def pairs(split: str) -> list[dict]:
    """Preference pairs in the prompt/chosen/rejected format: chosen the fact's answer, rejected the
    base model's own reply, for every question whose reply does not already show the behaviour.
    A reply the token limit cut ends at its last complete sentence: ending it mid-sentence would
    make the rejected answer's EOS, and so its mean log-prob, unlikely for a reason of our making."""
    out = []
    for fact in facts(split):
        reply = base_replies()[fact.question]
        finished = reply["finish_reason"] == "stop"
        if shows_behaviour(reply["reply"], finished):
            continue
        rejected = reply["reply"] if finished else whole_sentences(reply["reply"])
        out.append(
            {
                "prompt": [{"role": "user", "content": fact.question}],
                "chosen": fact.answer,
                "rejected": rejected,
                "topic": fact.topic,
            }
        )
    return out


def write_data(out_dir: str | Path) -> dict[str, Path]:
    """train.jsonl and eval.jsonl (held-out topics) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, name in (("train", "train.jsonl"), ("held-out", "eval.jsonl")):
        written[split] = write_text(out_dir / name, "".join(json.dumps(p) + "\n" for p in pairs(split)))
    return written


def regenerate(gguf_file: str | Path, out: Path) -> None:
    """The base model's greedy reply to every question, through llama.cpp (the chat template in the file)."""
    from serve.llama import opened

    rows = []
    with opened(gguf_file, n_ctx=GENERATION["n_ctx"]) as llm:
        for fact in all_facts():
            out_ = llm.create_chat_completion(
                [{"role": "user", "content": fact.question}], max_tokens=GENERATION["max_tokens"], temperature=0.0
            )
            choice = out_["choices"][0]
            rows.append(
                {
                    "question": fact.question,
                    "reply": choice["message"]["content"],
                    "finish_reason": choice["finish_reason"],
                }
            )
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--regenerate", action="store_true", help=f"rewrite data/{BASE_REPLIES} with the base model's greedy replies"
    )
    parser.add_argument("--write", type=Path, help="write train.jsonl and eval.jsonl into this directory")
    args = parser.parse_args(argv)
    if args.regenerate:
        from orpo_demo.real_model import packaged_gguf

        out = Path(__file__).parent / "data" / BASE_REPLIES
        regenerate(packaged_gguf(), out)
        print(f"wrote {out}")
    if args.write:
        for split, path in write_data(args.write).items():
            print(f"{split}: {path}")


if __name__ == "__main__":
    main()

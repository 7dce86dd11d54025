"""Text generation on a llama.cpp model, token by token: what `orpo serve` and `orpo chat` stream.

Our loop over `Llama.generate` (llama.cpp's sampler, llama-cpp-python's KV-prefix reuse) instead
of `Llama.create_completion`, for three reasons found in use:
- create_completion detokenizes the whole answer again after every token, and while a character
  is incomplete (a byte token, an emoji split over tokens) it retries every pending prefix and
  emits nothing: quadratic to cubic time, and a client that leaves is never noticed because
  nothing is sent. Here every token is decoded once, incrementally; a byte that can never
  complete a character becomes U+FFFD, as bytes.decode(errors="replace") would make it.
- `stop_requested` is asked after every token, text or not: a disconnect, a deadline or a
  shutdown ends the generation at the next token.
- The prompt's tokens are the caller's: the server tokenizes chat prompts with core.tokenize, as
  training did.
tests/test_generate.py checks the text against create_completion's on the same settings.
"""

from __future__ import annotations

import codecs
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from serve import llama


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    grammar: str | None = None  # GBNF, already checked by serve.llama.grammar_error
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class Outcome:
    """Filled in as the generation runs: its text, its tokens and why it ended."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None  # "stop" (end of turn or a stop string), "length", "cancelled"


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of text could begin a stop string (so must not be sent yet)."""
    return max((i for s in stops for i in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:i])), default=0)


def _logit_bias(bias: dict[int, float]):
    ids = np.fromiter(bias, dtype=np.int64, count=len(bias))
    values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def apply(_input_ids, scores):
        scores[ids] += values
        return scores

    return [apply]


def generate(
    llm,
    prompt: list[int],
    max_tokens: int,
    stop: Sequence[str] = (),
    sampling: Sampling = Sampling(),
    stop_requested: Callable[[], bool] = lambda: False,
    outcome: Outcome | None = None,
) -> Iterator[str]:
    """Yields the answer's text as it is generated (pieces never split a character or a stop
    string's possible start); fills `outcome`. Ends at the model's end-of-turn token, a stop string
    (not included), max_tokens, or the first token after stop_requested() turns true."""
    import llama_cpp

    outcome = outcome if outcome is not None else Outcome()
    outcome.prompt_tokens, outcome.finish_reason = len(prompt), "length"
    stops = [s for s in stop if s]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending, sent, found = "", [], []
    llm.set_seed(sampling.seed % (1 << 32) if sampling.seed is not None else random.getrandbits(32))
    # fmt: off
    tokens = llm.generate(
        prompt, temp=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p,
        typical_p=sampling.typical_p, repeat_penalty=sampling.repeat_penalty,
        presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
        grammar=llama_cpp.LlamaGrammar.from_string(sampling.grammar, verbose=False) if sampling.grammar else None,
        logits_processor=_logit_bias(sampling.logit_bias) if sampling.logit_bias else None)
    # fmt: on
    try:
        for token in tokens:
            if stop_requested():
                outcome.finish_reason = "cancelled"
                break
            if llama.is_end_of_generation(llm, token):
                outcome.finish_reason = "stop"
                break
            outcome.completion_tokens += 1
            pending += decoder.decode(llm.detokenize([token]))
            found = [i for i in (pending.find(s) for s in stops) if i >= 0]
            if found:
                pending, outcome.finish_reason = pending[: min(found)], "stop"
                break
            ready = len(pending) - _held_back(pending, stops)
            if ready > 0:
                sent.append(pending[:ready])
                pending = pending[ready:]
                yield sent[-1]
            if outcome.completion_tokens >= max_tokens:
                break
    finally:
        tokens.close()
    if outcome.finish_reason != "cancelled":
        if not found:  # bytes of an unfinished character at the very end
            pending += decoder.decode(b"", final=True)
        if pending:
            sent.append(pending)
            yield pending
    outcome.text = "".join(sent)


def complete(llm, prompt: list[int], max_tokens: int, **kwargs) -> Outcome:
    """generate() to the end; the Outcome holds the text."""
    outcome = Outcome()
    for _ in generate(llm, prompt, max_tokens, outcome=outcome, **kwargs):
        pass
    return outcome

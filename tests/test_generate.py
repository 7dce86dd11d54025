"""serve.serving.generate, the token loop behind `orpo serve` and `orpo chat`: the same text as
llama-cpp-python's create_completion on the same settings, and the decoding and stop-string rules
on every split of bytes into tokens."""

from __future__ import annotations

import pytest
import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.export.convert import convert
from serve.serving import generate as gen


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from serve.llama import open_gguf

    root = tmp_path_factory.mktemp("generate")
    tokenizer = tiny.build_tokenizer(None, bos_token="<|endoftext|>")
    tiny.build_model("llama", root / "hf", tokenizer=tokenizer, initializer_range=0.1)
    llm = open_gguf(convert(root / "hf", root / "m.gguf", "f32"), n_ctx=512, threads=2)
    yield llm
    llm.close()


CASES = [  # (prompt, max_tokens, stop, sampling)
    ("Hello there", 40, [], gen.Sampling(temperature=0)),
    ("The answer is", 60, ["e", "an"], gen.Sampling(temperature=0)),
    ("Once upon", 30, [], gen.Sampling(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, seed=1234)),
    (
        "Numbers:",
        30,
        [" t"],
        gen.Sampling(temperature=0.7, repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4, seed=7),
    ),
]


@pytest.mark.parametrize(("prompt", "max_tokens", "stop", "sampling"), CASES)
def test_the_text_equals_llama_cpp_python_s_create_completion(llm, prompt, max_tokens, stop, sampling):
    tokens = llm.tokenize(prompt.encode())
    # fmt: off
    theirs = llm.create_completion(
        tokens, max_tokens=max_tokens, stop=stop, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, min_p=sampling.min_p, typical_p=sampling.typical_p,
        repeat_penalty=sampling.repeat_penalty, presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty, seed=sampling.seed)
    # fmt: on
    outcome = gen.Outcome()
    pieces = list(gen.generate(llm, tokens, max_tokens, stop, sampling, outcome=outcome))
    assert "".join(pieces) == outcome.text and all(pieces)
    # the same tokens; bytes that are no character are U+FFFD here, where create_completion drops them
    assert outcome.text.replace("\ufffd", "") == theirs["choices"][0]["text"]
    assert outcome.completion_tokens == theirs["usage"]["completion_tokens"]
    assert outcome.finish_reason == theirs["choices"][0]["finish_reason"]


class _Bytes:
    """A stand-in Llama whose tokens are given byte strings, in order; token -1 ends the turn."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def set_seed(self, seed):
        pass

    def generate(self, prompt, **settings):
        yield from range(len(self.pieces))
        yield -1

    def detokenize(self, tokens):
        return b"".join(self.pieces[t] for t in tokens)


def _reference(pieces: list[bytes], stops: list[str], max_tokens: int) -> str:
    """The rule, computed the slow way: the first token after which the decoded text contains a stop
    string ends it there; else all bytes up to max_tokens, decoded with U+FFFD for bad bytes."""
    for k in range(1, min(len(pieces), max_tokens) + 1):
        text = b"".join(pieces[:k]).decode("utf-8", errors="replace")
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[: min(hits)]
    return b"".join(pieces[:max_tokens]).decode("utf-8", errors="replace")


UTF8 = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=12)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(UTF8, max_size=8),
    st.data(),
    st.lists(st.sampled_from(["ab", "a", "é!", "\n\n", "b c"]), max_size=2),
    st.integers(1, 40),
    st.lists(st.binary(min_size=1, max_size=1), max_size=2),
)
def test_decoding_and_stop_strings_on_every_split_of_the_bytes(
    monkeypatch_module, texts, data, stops, max_tokens, stray
):
    raw = "".join(texts).encode() + b"".join(stray)  # stray bytes: often not UTF-8
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=len(raw))))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)]) if raw[a:b]]
    outcome = gen.Outcome()
    out = list(gen.generate(_Bytes(pieces), [1], max_tokens, stops, outcome=outcome))
    assert "".join(out) == outcome.text == _reference(pieces, stops, max_tokens)
    assert all(out)
    ended_by_stop = any(s in b"".join(pieces[:max_tokens]).decode("utf-8", "replace") for s in stops)
    assert outcome.finish_reason == ("stop" if ended_by_stop or len(pieces) < max_tokens else "length")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gen.llama, "is_end_of_generation", lambda llm, token: token == -1)
        yield patch


def test_a_stop_request_ends_the_generation_at_the_next_token():
    calls = []

    def stop_requested():
        calls.append(1)
        return len(calls) > 3

    pieces = [b"\xe2"] * 100  # never a whole character: nothing to send, yet the request is seen
    outcome = gen.Outcome()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gen.llama, "is_end_of_generation", lambda llm, token: token == -1)
        list(gen.generate(_Bytes(pieces), [1], 100, stop_requested=stop_requested, outcome=outcome))
    assert outcome.finish_reason == "cancelled" and outcome.completion_tokens == 3

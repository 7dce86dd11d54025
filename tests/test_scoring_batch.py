"""Scoring many pairs per llama_decode (LlamaCppScorer's packs on a Llama opened with sequences):
equal to the one-pair path, the cache left as llama-cpp-python believes, and a server that lets a
chat in between two batches of a long scoring request."""

from __future__ import annotations

import random
import threading

import httpx
import pytest
from test_cli import _env
from test_server import _cached_positions, _check_follow_up, _greedy, model  # noqa: F401 (fixture)

from orpo_demo.serving import running
from serve.llama import open_gguf
from serve.scoring import LlamaCppScorer, pair_tokens, score_ids, score_packs

N_CTX = 512


def _pairs(vocab: int) -> list[tuple]:
    """Varied lengths; answers of one token; a pair longer than a decode (n_batch 16); one whose
    answers fill the cache together (prompt + both = n_ctx); one whose answers do not fit together
    (prompt + longest = n_ctx: scored one answer after the other)."""
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(10, vocab) for _ in range(n)]  # noqa: E731
    pairs = [
        (ids(rng.choice([1, 4, 30, 90])), ids(rng.choice([1, 2, 9, 40])), ids(rng.choice([1, 3, 17, 60])))
        for _ in range(24)
    ]
    pairs += [(ids(5), ids(1), ids(1)), (ids(1), ids(1), ids(1))]
    pairs += [(ids(N_CTX - 200), ids(101), ids(101))]  # pair_tokens == N_CTX
    pairs += [(ids(N_CTX - 150), ids(150), ids(120))]  # prompt + chosen == N_CTX
    return pairs


@pytest.fixture()
def scorers(model):  # noqa: F811
    one = open_gguf(model["f32"], n_ctx=N_CTX, threads=2)
    many = open_gguf(model["f32"], n_ctx=N_CTX, threads=2, n_batch=16, sequences=128)
    yield LlamaCppScorer(one), LlamaCppScorer(many, pack_tokens=200), many
    one.close()
    many.close()


def test_packs_equal_the_one_pair_path(scorers):
    one, many, llm = scorers
    pairs = _pairs(llm.n_vocab())
    plan = many.plan(pairs)
    assert sorted(i for pack in plan for i in pack) == list(range(len(pairs)))
    assert max(map(len, plan)) > 3, plan  # several pairs share a batch
    assert [len(pairs) - 2] in plan and [len(pairs) - 1] in plan  # the long ones are alone
    assert pair_tokens(*pairs[-2]) == N_CTX and pair_tokens(*pairs[-1]) > N_CTX
    assert any(sum(pair_tokens(*pairs[i]) for i in pack) > 16 for pack in plan)  # packs span decodes

    packed = {}
    for pack, results in score_packs(many, pairs):
        packed.update(zip(pack, results))
    for i, pair in enumerate(pairs):
        alone = score_ids(one, *pair)
        for side in ("chosen", "rejected"):
            assert packed[i][side]["n_tokens"] == alone[side]["n_tokens"] == len(pair[1 if side == "chosen" else 2])
            assert packed[i][side]["avg_logprob"] == pytest.approx(alone[side]["avg_logprob"], abs=1e-4), (i, side)
            assert packed[i][side]["logprob"] == pytest.approx(
                alone[side]["logprob"], abs=1e-4 * alone[side]["n_tokens"]
            ), (i, side)
        assert packed[i]["preferred"] == alone["preferred"] or abs(alone["log_odds_ratio"]) < 1e-3


def test_a_chat_after_a_batched_score_reuses_only_what_is_cached(scorers, model):  # noqa: F811
    _, many, llm = scorers
    pairs = _pairs(llm.n_vocab())[:8]
    prompt = pairs[0][0] + pairs[0][1][:-1]
    _greedy(llm, prompt)  # a chat fills sequence 0 first
    for _ in score_packs(many, pairs):
        pass
    assert llm.n_tokens == _cached_positions(llm) == 0
    _check_follow_up(llm, model, prompt)  # and the next one equals a fresh model's
    assert llm.n_tokens == _cached_positions(llm) > 0


def test_a_failed_batched_decode_empties_the_cache(scorers):
    _, many, llm = scorers
    pairs = _pairs(llm.n_vocab())[:4] + [([5, 6, 7], [8, llm.n_vocab() + 3, 9], [10, 11])]
    with pytest.raises(RuntimeError, match="llama_decode failed"):
        for _ in score_packs(many, pairs):
            pass
    assert llm.n_tokens == _cached_positions(llm) == 0
    assert all(llama_memory_empty(llm, seq) for seq in range(8))


def llama_memory_empty(llm, seq: int) -> bool:
    import llama_cpp

    return llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm._ctx.ctx), seq) == -1


def test_a_chat_during_a_batched_score_request_is_answered_and_the_scores_equal_one_by_one(model):  # noqa: F811
    """A 64-pair request in batches of about 100 tokens, with a chat sent while it runs: both are
    answered, and the scores equal those of the same pairs sent one by one. That the chat waits at
    most one batch is measured in benchmarks/bench_serve_stops.py (timings are not asserted here)."""
    words = "the of to and in is it you that was for on are with as his they at one have this".split()
    rng = random.Random(1)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    pairs = [{"prompt": text(40), "chosen": text(12), "rejected": text(9), "template": False} for _ in range(64)]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with running(model["f32"], "--n-ctx", "512", "--n-threads", "2", "--score-batch", "100", env=_env()) as url:
        done = {}

        def batch():
            done["batch"] = httpx.post(f"{url}/v1/score", json={"pairs": pairs}, timeout=600)

        worker = threading.Thread(target=batch)
        worker.start()
        answer = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=600)
        worker.join()
        assert answer.status_code == 200 and done["batch"].status_code == 200, done["batch"].text
        results = done["batch"].json()["results"]
        for pair, result in list(zip(pairs, results))[::16]:
            alone = httpx.post(f"{url}/v1/score", json=pair, timeout=60).json()
            assert result["chosen"]["avg_logprob"] == pytest.approx(alone["chosen"]["avg_logprob"], abs=1e-4)
            assert result["rejected"]["avg_logprob"] == pytest.approx(alone["rejected"]["avg_logprob"], abs=1e-4)

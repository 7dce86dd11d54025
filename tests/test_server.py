"""`orpo serve` over real HTTP (uvicorn on a loopback port): /v1/score against transformers,
KV reuse against full evaluation, the OpenAI client, API keys, bad input, concurrency."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import subprocess

import httpx
import llama_cpp
import numpy as np
import pytest
import tiny
import torch
from test_cli import BIN, _env
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo_demo.serving import free_port, running
from serve.export.convert import convert
from serve.scoring import (
    HFScorer,
    LlamaCppScorer,
    PairText,
    pair_ids,
    score_ids,
    score_pair,
)

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# llama.cpp keeps its KV cache in f16, so even an f32 GGUF is not bit-equal to transformers.
TOLERANCE = {"f32": 1e-3, "f16": 5e-3}
PAIRS = [
    {"prompt": "What is 12 + 30?", "chosen": "12 + 30 = 42", "rejected": "12 + 30 = 43"},
    {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another one?"},
        ],
        "chosen": "Eleven, which is prime.",
        "rejected": "Nine",
    },
    {"prompt": "Raw text, no template:", "chosen": " a plain continuation", "rejected": " nope", "template": False},
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A Llama-style model (BOS added by its tokenizer, ChatML template) and its f32/f16 GGUFs."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = tiny.build_tokenizer(None, bos_token="<|endoftext|>")
    tiny.build_model("llama", root / "hf", tokenizer=tokenizer, initializer_range=0.1)
    return {"hf": root / "hf", **{t: convert(root / "hf", root / f"model-{t}.gguf", t) for t in ("f32", "f16")}}


@pytest.fixture(scope="module", params=["f32", "f16"])
def server(request, model):
    with running(model[request.param], "--api-key", KEY, "--n-ctx", "512", "--n-threads", "2", env=_env()) as url:
        yield request.param, url


def _score(url, body, headers=AUTH):
    return httpx.post(f"{url}/v1/score", json=body, headers=headers, timeout=60)


def test_score_equals_transformers_on_the_same_tokens(server, model):
    kind, url = server
    hf = HFScorer(AutoModelForCausalLM.from_pretrained(str(model["hf"]), dtype=torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(str(model["hf"]))
    response = _score(url, {"pairs": PAIRS})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(PAIRS)
    for body, got in zip(PAIRS, results):
        want = score_pair(hf, tokenizer, PairText(**body))
        for side in ("chosen", "rejected"):
            assert got[side]["n_tokens"] == want[side]["n_tokens"]
            assert got[side]["avg_logprob"] == pytest.approx(want[side]["avg_logprob"], abs=TOLERANCE[kind])
            assert got[side]["logprob"] == pytest.approx(
                want[side]["logprob"], abs=TOLERANCE[kind] * want[side]["n_tokens"]
            )
        assert got["log_odds_ratio"] == pytest.approx(want["log_odds_ratio"], abs=20 * TOLERANCE[kind])
        assert got["preferred"] == ("chosen" if got["log_odds_ratio"] > 0 else "rejected")
    single = _score(url, PAIRS[0]).json()  # one pair in, one result out (no "results" wrapper)
    assert single["chosen"]["avg_logprob"] == pytest.approx(results[0]["chosen"]["avg_logprob"], abs=1e-9)


def test_kv_reuse_equals_full_evaluation(model):
    """Our reuse (prompt once, answers on top) against llama-cpp-python's own full evaluation of
    each sequence (Llama.eval with logits_all), and against our own full path."""
    plain = llama_cpp.Llama(
        model_path=str(model["f32"]), n_ctx=512, n_batch=8, logits_all=True, n_threads=2, verbose=False
    )
    ours = llama_cpp.Llama(model_path=str(model["f32"]), n_ctx=512, n_batch=8, n_threads=2, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(str(model["hf"]))
    try:
        for body in PAIRS:
            prompt, chosen, rejected = pair_ids(tokenizer, PairText(**body))
            reused = score_ids(LlamaCppScorer(ours), prompt, chosen, rejected)
            full = score_ids(LlamaCppScorer(ours), prompt, chosen, rejected, reuse_prompt=False)
            for side, answer in (("chosen", chosen), ("rejected", rejected)):
                plain.reset()
                plain.eval(prompt + answer)
                rows = np.asarray(plain.scores[len(prompt) - 1 : len(prompt) + len(answer) - 1], dtype=np.float64)
                logprobs = rows[np.arange(len(answer)), answer] - np.logaddexp.reduce(rows, axis=-1)
                assert reused[side]["logprob"] == pytest.approx(float(logprobs.sum()), abs=1e-4)
                assert reused[side]["logprob"] == pytest.approx(full[side]["logprob"], abs=1e-4)
    finally:
        plain.close()
        ours.close()


def test_openai_client_chats(server):
    import openai

    _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    reply = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.role == "assistant" and isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
    )
    assert len([chunk for chunk in stream]) >= 2
    completion = client.completions.create(model="x", prompt="Plain text:", max_tokens=4, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert [m.id for m in client.models.list()]


def test_api_key_guards_every_route_but_health(server):
    _, url = server
    assert httpx.get(f"{url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert _score(url, PAIRS[0], headers=headers).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            headers=headers,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert chat.status_code == 401
    assert _score(url, PAIRS[0]).status_code == 200
    for docs in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{url}{docs}").status_code == 401, docs
        assert httpx.get(f"{url}{docs}", headers=AUTH).status_code == 200, docs


BAD = [
    (b"{not json", 400, "invalid JSON"),
    (b"[1, 2]", 422, "body: expected a JSON object"),
    ({"chosen": "a", "rejected": "b"}, 422, "prompt: missing field"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, 422, "chosen: empty"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, 422, "chosen: expected a string, got int"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, 422, "rejected: null value"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, 422, "prompt[0]: expected a message"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, 422, "unknown role 'robot'"),
    (
        {"prompt": [{"role": "user", "content": ["x"]}], "chosen": "a", "rejected": "b"},
        422,
        "prompt[0].content: expected a string",
    ),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, 422, "roles out of order"),
    (
        {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b", "template": False},
        422,
        "needs the prompt as a string",
    ),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "template": "no"}, 422, "template: expected true or false"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "choosen": "a"}, 422, "choosen: unknown field"),
    ({"pairs": []}, 422, "pairs: expected a non-empty list"),
    ({"pairs": "x"}, 422, "pairs: expected a non-empty list"),
    ({"pairs": [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 65}, 422, "the limit is 64"),
    ({"pairs": [PAIRS[0], {"prompt": "q", "chosen": "a"}]}, 422, "pairs[1].rejected: missing field"),
    ({"prompt": "many words " * 400, "chosen": "a", "rejected": "b"}, 422, "but the context holds 512"),
    (b"x" * (2 << 20), 413, "request body over"),
]


def test_bad_requests_get_a_4xx_that_names_the_problem_and_the_server_keeps_serving(server):
    _, url = server
    for body, status, message in BAD:
        if isinstance(body, bytes):
            response = httpx.post(
                f"{url}/v1/score", content=body, timeout=60, headers={**AUTH, "Content-Type": "application/json"}
            )
        else:
            response = _score(url, body)
        assert response.status_code == status, (body if len(str(body)) < 200 else message, response.text)
        assert message in response.json()["error"]["message"], response.text
    assert httpx.get(f"{url}/v1/nowhere", headers=AUTH).status_code == 404
    assert httpx.get(f"{url}/v1/score", headers=AUTH).status_code == 405
    assert "error" in httpx.put(f"{url}/health").json()
    assert _score(url, PAIRS[0]).status_code == 200


def test_concurrent_clients_are_served_in_turn(server):
    """8 clients x 12 mixed requests: no errors, and every score equals the sequential one."""
    _, url = server
    expected = _score(url, PAIRS[1]).json()

    def client(i):
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
            out = []
            for j in range(12):
                if (i + j) % 3 == 0:
                    r = http.post(
                        "/v1/chat/completions",
                        json={
                            "messages": [{"role": "user", "content": f"hi {j}"}],
                            "max_tokens": 6,
                            "stream": j % 2 == 0,
                        },
                    )
                    out.append((r.status_code, None))
                else:
                    r = http.post("/v1/score", json=PAIRS[1])
                    out.append((r.status_code, r.json()))
            return out

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = [r for batch in pool.map(client, range(8)) for r in batch]
    assert [status for status, _ in results] == [200] * len(results)
    for _, body in results:
        if body is not None:
            assert body["chosen"]["logprob"] == pytest.approx(expected["chosen"]["logprob"], abs=1e-6)
            assert body["rejected"]["logprob"] == pytest.approx(expected["rejected"]["logprob"], abs=1e-6)


def test_a_file_that_is_not_a_loadable_gguf_is_refused_at_startup(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\0" * 64)
    for path, message in (
        (tmp_path / "missing.gguf", "no such file"),
        (junk, "not a GGUF file"),
        (truncated, "llama.cpp could not load it"),
    ):
        proc = subprocess.run(
            [str(BIN / "orpo"), "serve", str(path), "--port", str(free_port())],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _cached_positions(llm) -> int:
    """How many positions llama.cpp's KV cache really holds for sequence 0."""
    return llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm._ctx.ctx), 0) + 1


def _greedy(llm, tokens: list[int], n: int = 4) -> list[int]:
    """n greedy tokens through Llama.generate, which reuses the cached prefix it believes in."""
    import itertools

    return list(itertools.islice(llm.generate(tokens, temp=0.0), n))


@pytest.fixture()
def llm(model):
    from serve.llama import open_gguf

    llm = open_gguf(model["f32"], n_ctx=512, threads=2, n_batch=8)
    yield llm
    llm.close()


def _check_follow_up(llm, model, tokens):
    """llama-cpp-python's view of its cache is true, and a generation that extends what was scored
    (its prefix reuse trusts that view) equals one on a fresh model."""
    from serve.llama import open_gguf

    assert llm.n_tokens == _cached_positions(llm)
    fresh = open_gguf(model["f32"], n_ctx=512, threads=2, n_batch=8)
    try:
        assert _greedy(llm, tokens) == _greedy(fresh, tokens)
    finally:
        fresh.close()


def test_a_one_token_answer_leaves_the_cache_as_llama_cpp_believes(llm, model):
    from serve.tokenizer import GGUFTokenizer

    tokenizer = GGUFTokenizer(llm)
    prompt, chosen, rejected = pair_ids(tokenizer, PairText("What is 2 + 2?", "The answer is four.", "<|im_end|>"))
    assert len(rejected) == 1
    score_ids(LlamaCppScorer(llm), prompt, chosen, rejected)
    _check_follow_up(llm, model, prompt + chosen[:-1] + tokenizer(" More", add_special_tokens=False)["input_ids"])


def test_a_failed_decode_leaves_the_cache_as_llama_cpp_believes(llm, model):
    from serve.tokenizer import GGUFTokenizer

    tokenizer = GGUFTokenizer(llm)
    prompt, chosen, _ = pair_ids(tokenizer, PairText("What is 2 + 2?", "The answer is four.", "x"))
    with pytest.raises(RuntimeError):  # a token id outside the vocabulary: llama_decode fails mid-answer
        score_ids(LlamaCppScorer(llm), prompt, chosen, [5, 6, llm.n_vocab() + 7, 8, 9, 10, 11, 12, 13, 14])
    _check_follow_up(llm, model, prompt + chosen[:-1])


def test_the_server_harness_leaves_no_file_open(model):
    import os

    before = sorted(os.listdir("/proc/self/fd"))
    with running(model["f16"], "--n-ctx", "256", "--n-threads", "2") as url:
        assert httpx.get(f"{url}/health").status_code == 200
    assert sorted(os.listdir("/proc/self/fd")) == before


LONG_TOKEN = "=" * 40  # longer than llama-cpp-python 0.3.36's 32-byte piece buffer


@pytest.fixture(scope="module")
def long_token_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("long-token")
    return convert(tiny.one_token_model(root / "hf", LONG_TOKEN), root / "m.gguf", "f32")


def test_tokens_longer_than_32_bytes_keep_their_text(long_token_model):
    from serve.llama import opened

    with opened(long_token_model, n_ctx=256, threads=2) as llm:
        assert llm.detokenize(llm.tokenize(LONG_TOKEN.encode(), add_bos=False)) == LONG_TOKEN.encode()
        assert llm.create_completion("Hi", max_tokens=3, temperature=0)["choices"][0]["text"] == LONG_TOKEN * 3
    with running(long_token_model, "--n-ctx", "256", "--n-threads", "2") as url:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["message"]["content"] == LONG_TOKEN * 3
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
            chunks = [line for line in s.iter_lines() if line.startswith("data: {")]
        import json

        text = "".join(json.loads(c[6:])["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == LONG_TOKEN * 3
    chat = subprocess.run(
        [
            str(BIN / "orpo"),
            "chat",
            str(long_token_model),
            "--n-threads",
            "2",
            "--max-tokens",
            "2",
            "--temperature",
            "0",
        ],
        input="Hi\n/exit\n",
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0 and LONG_TOKEN * 2 in chat.stdout


BAD_GRAMMARS = {
    "root ::= (": "expecting",
    "root ::= foo": "Undefined rule identifier 'foo'",
    'root ::= root "a"': "left recursion",
    "plain text": "expecting",
    # llama.cpp's parser recurses once per parenthesis: this one overflows its stack
    "root ::= " + "(" * 20000 + '"a"' + ")" * 20000: "crashed",
}


def test_a_bad_grammar_is_a_422_and_cannot_take_the_server_down(server):
    """Each of these ended the process with SIGSEGV when llama.cpp's parser ran in it."""
    _, url = server
    for route, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ):
        for grammar, why in BAD_GRAMMARS.items():
            response = httpx.post(
                f"{url}{route}", headers=AUTH, timeout=120, json={**body, "max_tokens": 2, "grammar": grammar}
            )
            assert response.status_code == 422, (route, grammar[:40], response.text)
            error = response.json()["error"]
            assert error["param"] == "grammar" and why in error["message"], (grammar[:40], error)
        good = httpx.post(
            f"{url}{route}",
            headers=AUTH,
            timeout=120,
            json={**body, "max_tokens": 3, "grammar": 'root ::= "yes" | "no"'},
        )
        assert good.status_code == 200, good.text
        choice = good.json()["choices"][0]
        assert (choice.get("message") or {}).get("content", choice.get("text")) in ("yes", "no")
    assert _score(url, PAIRS[0]).status_code == 200


def test_browsers_and_rebinding_are_kept_out_unless_allowed(model):
    page = {"Origin": "http://evil.example", **AUTH}
    with running(model["f16"], "--api-key", KEY, "--n-ctx", "512", env=_env()) as url:
        # no CORS at all by default: no page can read an answer, not even with credentials
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            headers=page,
            timeout=60,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert chat.status_code == 200 and "access-control-allow-origin" not in chat.headers
        preflight = httpx.options(
            f"{url}/v1/score", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in preflight.headers
        # a page on another name that resolves to 127.0.0.1 (DNS rebinding)
        rebound = httpx.post(f"{url}/v1/score", json=PAIRS[0], headers={**AUTH, "Host": "evil.example:8000"})
        assert rebound.status_code == 400 and "--allowed-host evil.example" in rebound.json()["error"]["message"]
        for host in ("localhost", "127.0.0.1", "[::1]"):
            assert httpx.get(f"{url}/health", headers={"Host": f"{host}:1"}).status_code == 200, host
        # text/plain needs no preflight, so /v1/score takes JSON only
        plain = httpx.post(
            f"{url}/v1/score", content=json.dumps(PAIRS[0]), timeout=60, headers={**AUTH, "Content-Type": "text/plain"}
        )
        assert plain.status_code == 415
    with running(
        model["f16"],
        "--api-key",
        KEY,
        "--n-ctx",
        "512",
        "--cors-origin",
        "http://app.example",
        "--allowed-host",
        "box.lan",
        env=_env(),
    ) as url:
        allowed = httpx.post(
            f"{url}/v1/score",
            json=PAIRS[0],
            timeout=60,
            headers={**AUTH, "Origin": "http://app.example", "Host": "box.lan"},
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-credentials" not in allowed.headers
        other = httpx.post(f"{url}/v1/score", json=PAIRS[0], timeout=60, headers=page)
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_a_generation_from_exactly_the_scored_prompt_does_not_sample_from_a_score_s_logits(llm, model):
    """After a score whose last answer is one token, the cache holds exactly the prompt but the
    last logits are the other answer's: a chat on that prompt must decode again, not sample them."""
    from serve.tokenizer import GGUFTokenizer

    tokenizer = GGUFTokenizer(llm)
    prompt, chosen, rejected = pair_ids(tokenizer, PairText("What is 2 + 2?", "The answer is four.", "<|im_end|>"))
    score_ids(LlamaCppScorer(llm), prompt, chosen, rejected)
    _check_follow_up(llm, model, prompt)


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
INVALID = [  # (route, body, status, param); each was a 500 from llama-cpp-python's server
    ("/v1/chat/completions", {**CHAT, "top_p": 5}, 422, "top_p"),
    ("/v1/chat/completions", {**CHAT, "top_k": -1}, 422, "top_k"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 422, "temperature"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 1e308}, 422, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 100000}, 422, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "n": 2}, 422, "n"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, 422, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"99999999": 1}}, 422, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, 422, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 422, "messages[0].role"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 422, "messages[0].content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]},
        422,
        "messages[0].content[0]",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "many words " * 400}]}, 422, "messages"),
    (
        "/v1/chat/completions",
        {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}},
        422,
        "response_format.json_schema.schema",
    ),
    ("/v1/completions", {}, 422, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 422, "prompt[0]"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 422, "suffix"),
    ("/v1/score", {"prompt": "\ud800", "chosen": "a", "rejected": "b"}, 400, "prompt"),
    ("/v1/score", {"pairs": [PAIRS[0], {"prompt": "q", "chosen": "\udfff", "rejected": "b"}]}, 400, "pairs[1].chosen"),
]
RAW = [  # (route, body bytes, content type, status)
    ("/v1/chat/completions", json.dumps(CHAT).encode(), "text/plain", 415),
    ("/v1/chat/completions", b"", "application/json", 400),
    ("/v1/chat/completions", b'{"messages": "\xff\xfe"}', "application/json", 400),
    ("/v1/score", b"[" * 10000 + b"]" * 10000, "application/json", 400),
    ("/v1/score", b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}', "application/json", 400),
]


def test_every_invalid_request_is_a_4xx_naming_the_field_without_paths(server, model):
    kind, url = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        for route, body, status, param in INVALID:
            raw = json.dumps(body, ensure_ascii=True).encode()  # a lone surrogate only survives as an escape
            response = http.post(route, content=raw, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (route, body, response.text)
            error = response.json()["error"]
            assert error["param"] == param and error["message"].startswith(param), (body, error)
            assert str(model["hf"].parent) not in response.text and 'File "' not in response.text
        for route, raw, content_type, status in RAW:
            response = http.post(route, content=raw, headers={"Content-Type": content_type})
            assert response.status_code == status, (route, raw[:40], response.text)
            assert "error" in response.json()
        assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 404
        allowed = http.get("/v1/chat/completions")
        assert allowed.status_code == 405 and allowed.headers["allow"] == "POST"
        reply = http.post("/v1/chat/completions", json=CHAT).json()
        assert reply["model"] == model[kind].name  # the file's name, not its path


VALID_SHAPES = [
    [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 3?"}]}],
    [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "again"}],
    [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ],
]


def test_the_openai_chat_shapes_clients_send_are_answered(server):
    _, url = server
    for shape in VALID_SHAPES:
        response = httpx.post(
            f"{url}/v1/chat/completions",
            headers=AUTH,
            timeout=60,
            json={"messages": shape, "max_tokens": 3, "stream_options": {"include_usage": True}},
        )
        assert response.status_code == 200, (shape, response.text)
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        headers=AUTH,
        timeout=60,
        json={"messages": VALID_SHAPES[0], "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
    ) as stream:
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    from serve.serving.api import ChatCompletionChunk

    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens >= 1
    schema = httpx.get(f"{url}/openapi.json", headers=AUTH).json()
    score = schema["paths"]["/v1/score"]["post"]
    body = score["requestBody"]["content"]["application/json"]["schema"]["oneOf"]  # one pair, or a batch
    assert body == [{"$ref": "#/components/schemas/ScorePair"}, {"$ref": "#/components/schemas/ScoreBatch"}]
    assert {"ScorePair", "ScoreBatch", "PairScore", "ChatCompletionChunk"} <= set(schema["components"]["schemas"])


def _raw(url: str, head: bytes, body: bytes = b"", wait: float = 5.0) -> bytes:
    """Send head and body on a socket, keep it open, and return what the server answers within wait s."""
    import socket

    _, port = url.rsplit(":", 1)
    with socket.create_connection(("127.0.0.1", int(port)), timeout=wait) as sock:
        sock.sendall(head + body)
        try:
            return sock.recv(65536)
        except TimeoutError:
            return b""


def test_bodies_are_bounded_in_size_and_time_and_come_after_the_key(model):
    with running(model["f16"], "--api-key", KEY, "--n-ctx", "256", "--read-timeout", "1", env=_env()) as url:

        def chunked():
            for _ in range(64):
                yield b" " * 65536  # 4 MiB of JSON whitespace, chunked: no Content-Length to refuse up front

        response = httpx.post(
            f"{url}/v1/chat/completions",
            content=chunked(),
            timeout=60,
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert response.status_code == 413 and response.headers["connection"] == "close"
        head = (
            b"POST /v1/score HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n"
        )
        # no key: refused at once, the body never read
        assert _raw(url, head + b"\r\n", b'10\r\n{"prompt": "q", ', wait=3).startswith(b"HTTP/1.1 401")
        # a body that stops arriving: 408 after --read-timeout, not a worker held forever
        slow = _raw(
            url,
            head.replace(b"Transfer-Encoding: chunked", b"Content-Length: 100")
            + f"Authorization: Bearer {KEY}\r\n\r\n".encode(),
            b'{"prompt": ',
            wait=10,
        )
        assert slow.startswith(b"HTTP/1.1 408") and b"connection: close" in slow.lower()
        assert _score(url, PAIRS[0]).status_code == 200


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory):
    """A model that answers with byte 0xE2 forever: never a whole UTF-8 character (llama-cpp-python's
    stream loop sent nothing for such output and so never saw its client leave), 16k context,
    wide enough that a full answer takes several seconds."""
    root = tmp_path_factory.mktemp("endless")
    hf = tiny.one_token_model(
        root / "hf", "\u00e2", hidden_size=512, intermediate_size=1024, max_position_embeddings=16384
    )  # byte-level BPE's symbol for byte 0xE2
    return convert(hf, root / "m.gguf", "f32")


def _model_is_free(url: str) -> bool:
    reply = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=120)
    return reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 1


def test_a_client_that_leaves_frees_the_model(endless_model):
    """Streamed and not: the next request is answered. How soon is measured in
    benchmarks/bench_serve_stops.py (timings are not asserted in tests)."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 12000}
    with running(endless_model, "--n-ctx", "16384", "--n-threads", "2", env=_env()) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            while not (line := next(lines)).startswith("data: "):
                pass
            assert "\ufffd" in json.loads(line[6:])["choices"][0]["delta"]["content"]  # text flows, not held back
        assert _model_is_free(url)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming chat whose client gives up
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1)
        assert _model_is_free(url)


def test_sigterm_stops_the_server_mid_generation(endless_model):
    """The server shuts down on SIGTERM while it streams; how fast is in
    benchmarks/bench_serve_stops.py."""
    import signal
    import threading
    import time

    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "orpo"), "serve", str(endless_model), "--port", str(port), "--n-ctx", "16384", "--n-threads", "2"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.time() < deadline
                time.sleep(0.2)
        started = threading.Event()

        def reader():
            body = {
                "messages": [{"role": "user", "content": "Hi"}],
                "temperature": 0,
                "max_tokens": 12000,
                "stream": True,
            }
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as s,
            ):
                for _ in s.iter_lines():
                    started.set()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        assert started.wait(120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)  # uvicorn re-raises it once shut down
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

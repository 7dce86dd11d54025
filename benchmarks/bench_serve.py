"""Scoring throughput and serving under load, on a ~125M-parameter random Llama (q8_0 GGUF).

1. Pairs per second, prompt 512 tokens and answers of 63, all in one run:
   - /v1/score over HTTP with every pair in one request: batched (several pairs per llama_decode,
     every prompt decoded once into both answers' sequences, logits of answer rows only);
   - the one-pair path it replaced (prompt once, then each answer on its KV cache, one at a time);
   - llama-cpp-python scoring each full sequence (Llama(logits_all=True).eval, then a log-softmax
     over its scores, the obvious way);
   - transformers on the fp32 model (both sequences in one batch);
   - a plain llama_decode of the same number of tokens per pair, one sequence, logits of the last
     row only: what the hardware does with this model, the limit for any scorer here.
   Then the batched path's throughput by --score-batch (tokens per batch).
2. Load: 8 concurrent clients x 50 requests on loopback, a mix of batched /v1/score (4 pairs),
   short chats and streamed chats, a third of the streams left by their client mid-answer;
   errors, whether every score equals the reference, and latency percentiles by kind.

    python benchmarks/bench_serve.py [--pairs 12] [--clients 8] [--requests 50] [--load-only]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test fixtures (tiny models)
SHAPE = dict(
    hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4
)


def _words(rng: random.Random, n: int) -> str:
    vocab = "the of to and in is it you that was for on are with as his they at one have this".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_pairs(tokenizer, n: int, prompt_tokens: int, answer_tokens: int, seed: int = 0) -> list[dict]:
    """Raw-text pairs cut to exact token counts (answers include the closing EOS)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        texts = []
        for count in (prompt_tokens, answer_tokens - 1, answer_tokens - 1):
            ids = tokenizer(_words(rng, count * 2), add_special_tokens=False)["input_ids"][:count]
            texts.append(tokenizer.decode(ids))
        pairs.append({"prompt": texts[0], "chosen": " " + texts[1], "rejected": " " + texts[2], "template": False})
    return pairs


def full_sequence_llama_cpp(path: Path, encoded, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=1024, logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    start = time.perf_counter()
    for prompt, chosen, rejected in encoded:
        for answer in (chosen, rejected):
            llm.reset()
            llm.eval(prompt + answer)
            rows = np.asarray(llm.scores[len(prompt) - 1 : len(prompt) + len(answer) - 1], dtype=np.float64)
            (rows[np.arange(len(answer)), answer] - np.logaddexp.reduce(rows, axis=-1)).mean()
    seconds = time.perf_counter() - start
    llm.close()
    return len(encoded) / seconds


def transformers_fp32(model_dir: Path, encoded, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from serve.scoring import HFScorer

    torch.set_num_threads(threads)
    scorer = HFScorer(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval())
    start = time.perf_counter()
    for prompt, chosen, rejected in encoded:
        scorer.answer_logprobs(prompt, [chosen, rejected])
    return len(encoded) / (time.perf_counter() - start)


def prompt_len(encoded) -> int:
    return round(sum(len(p) for p, _, _ in encoded) / len(encoded))


def served(url: str, pairs: list[dict]) -> float:
    """Every pair in one /v1/score request."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as http:
        http.post("/v1/score", json=pairs[0]).raise_for_status()  # warm-up
        start = time.perf_counter()
        http.post("/v1/score", json={"pairs": pairs}).raise_for_status()
        return len(pairs) / (time.perf_counter() - start)


def _rate(path: Path, encoded, threads: int, score, **open_args) -> float:
    """Pairs per second of score(llm, encoded) on the GGUF opened with open_args."""
    from serve.llama import opened

    with opened(path, threads=threads, **open_args) as llm:
        start = time.perf_counter()
        score(llm, encoded)
        return len(encoded) / (time.perf_counter() - start)


def one_pair_path(path: Path, encoded, threads: int) -> float:
    """The path before batching: one pair at a time, each answer on the prompt's KV cache in turn."""
    from serve.scoring import LlamaCppScorer, score_ids

    def score(llm, pairs):
        scorer = LlamaCppScorer(llm)
        for pair in pairs:
            score_ids(scorer, *pair)

    return _rate(path, encoded, threads, score, n_ctx=1024)


def batched(path: Path, encoded, threads: int, score_batch: int | None) -> float:
    from serve.scoring import SEQUENCES, LlamaCppScorer, score_packs

    def score(llm, pairs):
        for _ in score_packs(LlamaCppScorer(llm, pack_tokens=score_batch), pairs):
            pass

    return _rate(path, encoded, threads, score, n_ctx=4096, sequences=SEQUENCES)


def plain_decode(path: Path, encoded, threads: int) -> float:
    """llama_decode of each pair's token count as one sequence, logits of its last row only."""
    from serve.llama import KVCache
    from serve.scoring import pair_tokens

    def score(llm, pairs):
        cache = KVCache(llm)
        for pair in pairs:
            cache.clear()
            cache.decode((pair[0] + pair[1] + pair[2])[: pair_tokens(*pair)], every_row=False)

    return _rate(path, encoded, threads, score, n_ctx=1024)


def load(url: str, clients: int, requests: int) -> dict:
    """Each client cycles score, chat, streaming chat; a third of its streams it closes after the
    first piece of text. Every score must equal the one taken before the load, and after it."""
    import httpx

    pair = {
        "pairs": [
            {"prompt": f"What is 12 + {n}?", "chosen": f"12 + {n} = {12 + n}", "rejected": f"12 + {n} = {13 + n}"}
            for n in (30, 7, 115, 2)
        ]
    }
    chat = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16}
    long = {**chat, "max_tokens": 256, "stream": True}  # the streams a client abandons would run on
    with httpx.Client(base_url=url, timeout=600) as http:
        reference = http.post("/v1/score", json=pair).json()

    def stream(http, body, leave: bool) -> int:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if leave and '"content":"' in line and '"content":""' not in line:
                    break  # the client goes away mid-answer
            return response.status_code

    def client(i):
        out = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for j in range(requests):
                kind, start, same = (i + j) % 3, time.perf_counter(), True
                if kind == 0:
                    r = http.post("/v1/score", json=pair)
                    status, same = r.status_code, r.json() == reference
                elif kind == 1:
                    status = http.post("/v1/chat/completions", json=chat).status_code
                else:
                    leave = (i + j) // 3 % 3 == 0
                    status = stream(http, long if leave else {**chat, "stream": True}, leave)
                    kind = 3 if leave else 2
                out.append((kind, status, same, time.perf_counter() - start))
        return out

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    wall = time.perf_counter() - start
    with httpx.Client(base_url=url, timeout=600) as http:
        after = http.post("/v1/score", json=pair).json()
    latencies = np.array([t for *_, t in results])
    kinds = [k for k, *_ in results]
    by_kind = {
        name: np.array([t for k, _, _, t in results if k in ks])
        for name, ks in (("score", (0,)), ("chat", (1,)), ("stream", (2, 3)))
    }
    return {
        "requests": len(results),
        "errors": sum(status != 200 for _, status, _, _ in results),
        "wall_s": wall,
        "scores": kinds.count(0),
        "chats": kinds.count(1),
        "streams": kinds.count(2) + kinds.count(3),
        "left_early": kinds.count(3),
        "scores_equal": all(same for *_, same, _ in results) and after == reference,
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "by_kind": {name: (float(np.percentile(t, 50)), float(np.percentile(t, 99))) for name, t in by_kind.items()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--load-only", action="store_true", help="only the load run")
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 1
    import tiny
    from transformers import AutoTokenizer

    from orpo_demo.serving import running
    from serve.export.convert import convert
    from serve.scoring import PairText, pair_ids

    with tempfile.TemporaryDirectory(prefix="orpo-bench-serve-") as tmp:
        tmp = Path(tmp)
        model = tiny.build_model(
            "llama", tmp / "model", vocab_size=32000, tokenizer=tiny.build_tokenizer(None), **SHAPE
        )
        params = sum(p.numel() for p in model.parameters())
        del model
        gguf = convert(tmp / "model", tmp / "model-q8_0.gguf", "q8_0")
        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "model"))
        pairs = make_pairs(tokenizer, args.pairs, 512, 64)
        encoded = [pair_ids(tokenizer, PairText(**p)) for p in pairs]
        print(
            f"model: {params / 1e6:.0f}M parameters, q8_0; {args.pairs} pairs, prompt "
            f"{len(encoded[0][0])} tokens, answers {len(encoded[0][1])} tokens; {threads} threads"
        )
        with running(gguf, "--n-ctx", "4096", "--n-threads", str(threads)) as url:
            ours = None if args.load_only else served(url, pairs)  # first: nothing else is running
            report = load(url, args.clients, args.requests)
        _print_load(args, report)
        if args.load_only:
            return
        one = one_pair_path(gguf, encoded, threads)
        plain = plain_decode(gguf, encoded, threads)
        short = [pair_ids(tokenizer, PairText(**p)) for p in make_pairs(tokenizer, 4 * args.pairs, 32, 16, seed=1)]
        sweep = {}
        for name, pairs_ in (
            (f"prompt {prompt_len(encoded)}, answers {len(encoded[0][1])}", encoded),
            (f"prompt {prompt_len(short)}, answers {len(short[0][1])}", short),
        ):
            sweep[name] = {
                "one pair at a time (the path before)": one_pair_path(gguf, pairs_, threads),
                **{
                    f"batched, --score-batch {size}": batched(gguf, pairs_, threads, size) for size in (512, 1024, 2048)
                },
                "plain llama_decode of the same tokens": plain_decode(gguf, pairs_, threads),
            }
        llama_full = full_sequence_llama_cpp(gguf, encoded, threads)
        hf = transformers_fp32(tmp / "model", encoded, threads)
    prompt, answer = len(encoded[0][0]), len(encoded[0][1])
    once, twice = prompt + 2 * answer - 2, 2 * (prompt + answer)  # tokens evaluated per pair
    print("| scorer | pairs/s | tokens evaluated per pair | tokens/s | batched /v1/score vs it |")
    print("|---|---|---|---|---|")
    rows = [
        ("/v1/score, all pairs in one request (HTTP, batched)", ours, once),
        ("one pair at a time, answers in turn (the path before)", one, once),
        ("llama-cpp-python, each full sequence", llama_full, twice),
        ("transformers fp32, both sequences in one batch", hf, twice),
        ("plain llama_decode of the same tokens (the limit)", plain, once),
    ]
    for name, rate, tokens in rows:
        print(f"| {name} | {rate:.2f} | {tokens} | {rate * tokens:.0f} | {ours / rate:.2f}x |")
    print()
    names = list(sweep)
    print(f"| in process, pairs/s | {' | '.join(names)} |")
    print("|---|" + "---|" * len(names))
    for row in sweep[names[0]]:
        print(f"| {row} | " + " | ".join(f"{sweep[n][row]:.2f}" for n in names) + " |")


def _print_load(args, report: dict) -> None:
    print(
        f"load: {args.clients} clients x {args.requests} requests ({report['scores']} batched scores of 4 pairs, "
        f"{report['chats']} "
        f"16-token chats, {report['streams']} streamed chats of which {report['left_early']} left by their client "
        f"mid-answer): {report['errors']} errors, every score equal to the reference before and after: "
        f"{report['scores_equal']}, {report['wall_s']:.1f} s, p50 {report['p50_s'] * 1000:.0f} ms, "
        f"p99 {report['p99_s'] * 1000:.0f} ms; by kind (p50/p99 ms): "
        + ", ".join(f"{k} {a * 1000:.0f}/{b * 1000:.0f}" for k, (a, b) in report["by_kind"].items())
    )


if __name__ == "__main__":
    main()

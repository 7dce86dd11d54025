"""Scoring throughput and serving under load, on a ~100M-parameter random Llama (q8_0 GGUF).

1. Pairs per second, prompt 512 tokens and answers of 64: our /v1/score over HTTP (prompt
   evaluated once, answers on its KV cache) against scoring each full sequence with
   llama-cpp-python (Llama(logits_all=True).eval, then a log-softmax over its scores, the
   obvious way) and against transformers on the fp32 model (both sequences in one batch).
2. Load: 8 concurrent clients x 50 requests on loopback, a mix of /v1/score and short chats;
   errors, and latency percentiles.

    python benchmarks/bench_serve.py [--pairs 12] [--clients 8] [--requests 50]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import random
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test fixtures (tiny models)
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4)


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

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, logits_all=True, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    start = time.perf_counter()
    for prompt, chosen, rejected in encoded:
        for answer in (chosen, rejected):
            llm.reset()
            llm.eval(prompt + answer)
            rows = np.asarray(llm.scores[len(prompt) - 1:len(prompt) + len(answer) - 1], dtype=np.float64)
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


def served(url: str, pairs: list[dict]) -> float:
    import httpx

    with httpx.Client(base_url=url, timeout=600) as http:
        http.post("/v1/score", json=pairs[0]).raise_for_status()  # warm-up
        start = time.perf_counter()
        for pair in pairs:
            http.post("/v1/score", json=pair).raise_for_status()
        return len(pairs) / (time.perf_counter() - start)


def load(url: str, clients: int, requests: int) -> dict:
    import httpx

    pair = {"prompt": "What is 12 + 30?", "chosen": "12 + 30 = 42", "rejected": "12 + 30 = 43"}
    chat = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16}

    def client(i):
        out = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for j in range(requests):
                start = time.perf_counter()
                r = http.post("/v1/score", json=pair) if (i + j) % 2 else http.post("/v1/chat/completions", json=chat)
                out.append((r.status_code, time.perf_counter() - start))
        return out

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    wall = time.perf_counter() - start
    latencies = np.array([t for _, t in results])
    return {"requests": len(results), "errors": sum(status != 200 for status, _ in results), "wall_s": wall,
            "p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 1
    from transformers import AutoTokenizer

    import tiny
    from serve.convert import convert
    from serve.scoring import PairText, encode_pair
    from orpo_demo.serving import running

    with tempfile.TemporaryDirectory(prefix="orpo-bench-serve-") as tmp:
        tmp = Path(tmp)
        model = tiny.build_model("llama", tmp / "model", vocab_size=32000, tokenizer=tiny.build_tokenizer(None), **SHAPE)
        params = sum(p.numel() for p in model.parameters())
        del model
        gguf = convert(tmp / "model", tmp / "model-q8_0.gguf", "q8_0")
        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "model"))
        pairs = make_pairs(tokenizer, args.pairs, 512, 64)
        encoded = [encode_pair(tokenizer, PairText(**p)) for p in pairs]
        print(f"model: {params / 1e6:.0f}M parameters, q8_0; {args.pairs} pairs, prompt "
              f"{len(encoded[0][0])} tokens, answers {len(encoded[0][1])} tokens; {threads} threads")
        with running(gguf, "--n-ctx", "1024", "--n-threads", str(threads)) as url:
            ours = served(url, pairs)
            report = load(url, args.clients, args.requests)
        llama_full = full_sequence_llama_cpp(gguf, encoded, threads)
        hf = transformers_fp32(tmp / "model", encoded, threads)
    prompt, answer = len(encoded[0][0]), len(encoded[0][1])
    once, twice = prompt + 2 * answer, 2 * (prompt + answer)  # tokens evaluated per pair
    print("| scorer | pairs/s | tokens evaluated per pair | tokens/s | /v1/score vs it |")
    print("|---|---|---|---|---|")
    print(f"| /v1/score (HTTP, prompt once, KV reuse) | {ours:.2f} | {once} | {ours * once:.0f} | 1.00 |")
    print(f"| llama-cpp-python, each full sequence | {llama_full:.2f} | {twice} | {llama_full * twice:.0f} | "
          f"{ours / llama_full:.2f}x |")
    print(f"| transformers fp32, both sequences in one batch | {hf:.2f} | {twice} | {hf * twice:.0f} | "
          f"{ours / hf:.2f}x |")
    print(f"load: {args.clients} clients x {args.requests} requests (score and 16-token chats alternating): "
          f"{report['requests']} requests, {report['errors']} errors, {report['wall_s']:.1f} s, "
          f"p50 {report['p50_s'] * 1000:.0f} ms, p99 {report['p99_s'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()

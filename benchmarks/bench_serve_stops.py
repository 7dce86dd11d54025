"""How fast `orpo serve` lets go: the timings the server tests used to assert, measured here instead.

1. A streaming chat's client leaves mid-answer: seconds until the model answers another request,
   against the seconds that request takes on an idle server.
2. The non-streaming form: a client that gives up after 1 s.
3. SIGTERM mid-generation: seconds until the server has exited.
4. A chat sent a third of the way into a 64-pair /v1/score request (batches of about 100 tokens):
   when it is answered, as a share of the scoring request's time (below 1: it did not wait for it).

The model answers byte 0xE2 forever (never a whole character), 16k context, 512 wide: a full answer
of 12,000 tokens is tens of seconds of work. Run: python benchmarks/bench_serve_stops.py
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from machine import cpu_name  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test fixtures (tiny models)

import tiny  # noqa: E402

from orpo_demo.env import BIN, offline_env  # noqa: E402
from orpo_demo.serving import free_port, running  # noqa: E402
from serve.export.convert import convert  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 12000}


def _free(url: str) -> float:
    start = time.monotonic()
    httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=300).raise_for_status()
    return time.monotonic() - start


def client_leaves(model: Path) -> dict:
    with running(model, "--n-ctx", "16384", "--n-threads", "2") as url:
        idle = min(_free(url) for _ in range(3))
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60) as s:
            lines = s.iter_lines()
            while not next(lines).startswith("data: "):
                pass
        streamed = _free(url)
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=1)
        given_up = _free(url)
    return {"idle request s": idle, "after a stream closed s": streamed, "after a 1 s timeout s": given_up}


def sigterm(model: Path) -> float:
    port = free_port()
    command = [str(BIN / "orpo"), "serve", str(model), "--port", str(port), "--n-ctx", "16384", "--n-threads", "2"]
    proc = subprocess.Popen(command, env=offline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)

        def reader():
            body = {**CHAT, "stream": True}
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as s,
            ):
                for _ in s.iter_lines():
                    pass

        threading.Thread(target=reader, daemon=True).start()
        time.sleep(1.0)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        return time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()


def chat_during_a_batch(model: Path) -> dict:
    words = "the of to and in is it you that was for on are with as his they at one have this".split()
    rng = random.Random(1)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    pairs = [{"prompt": text(40), "chosen": text(12), "rejected": text(9), "template": False} for _ in range(64)]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with running(model, "--n-ctx", "512", "--n-threads", "2", "--score-batch", "100") as url:
        alone = time.monotonic()
        httpx.post(f"{url}/v1/score", json={"pairs": pairs}, timeout=600).raise_for_status()
        alone = time.monotonic() - alone
        done = {}

        def batch():
            httpx.post(f"{url}/v1/score", json={"pairs": pairs}, timeout=600).raise_for_status()
            done["at"] = time.monotonic()

        worker = threading.Thread(target=batch)
        start = time.monotonic()
        worker.start()
        time.sleep(alone / 3)
        httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=600).raise_for_status()
        chat_at = time.monotonic() - start
        worker.join()
    return {"score request alone s": alone, "chat answered at s": chat_at, "share": chat_at / (done["at"] - start)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # byte-level BPE's symbol for byte 0xE2
        hf = tiny.one_token_model(
            root / "hf", "\u00e2", hidden_size=512, intermediate_size=1024, max_position_embeddings=16384
        )
        endless = convert(hf, root / "endless.gguf", "f32")
        tiny.build_model("llama", root / "small", tokenizer=tiny.build_tokenizer(None, bos_token="<|endoftext|>"))
        small = convert(root / "small", root / "small.gguf", "f32")
        print(f"CPU: {cpu_name()}")
        leaves = client_leaves(endless)
        for name, seconds in leaves.items():
            print(f"{name}: {seconds:.2f}")
        print(f"SIGTERM mid-generation to exit s: {sigterm(endless):.2f}")
        for name, value in chat_during_a_batch(small).items():
            print(f"chat during a 64-pair score request, {name}: {value:.2f}")


if __name__ == "__main__":
    main()

"""`orpo serve`: llama-cpp-python's OpenAI-compatible server plus GET /health and POST /v1/score.

The app is llama_cpp.server's own (chat, completions, models, with its API-key check); we add
two routes and a body-size limit. Scoring takes the same lock as generation, because a Llama is
not thread-safe: requests are served in turn, in arrival order (asyncio's lock is FIFO), so a
long chat stream delays a score request until it ends but never starves it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from orpo_plugin.formats import BadRow, check_prompt_order, messages, text
from serve.scoring import GGUFTokenizer, LlamaCppScorer, PairText, ScoreError, is_gguf, score_pair

MAX_PAIRS = 64  # per /v1/score request
MAX_BODY_BYTES = 1 << 20
PAIR_FIELDS = {"prompt", "chosen", "rejected", "template"}


class ServeError(ValueError):
    """The model cannot be served (missing or unreadable GGUF); exits the CLI with a message."""


class RequestError(ValueError):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _pair(item, where: str) -> PairText:
    if not isinstance(item, dict):
        raise RequestError(422, f"{where or 'body'}: expected a JSON object with prompt, chosen, rejected", where)
    unknown = sorted(set(item) - PAIR_FIELDS)
    if unknown:
        raise RequestError(422, f"{where}{'.' if where else ''}{unknown[0]}: unknown field; a pair has "
                                f"{', '.join(sorted(PAIR_FIELDS))}", unknown[0])
    prefix = f"{where}." if where else ""
    template = item.get("template", True)
    if not isinstance(template, bool):
        raise RequestError(422, f"{prefix}template: expected true or false", f"{prefix}template")
    try:
        if isinstance(item.get("prompt"), list):
            if not template:
                raise BadRow("prompt", "not_string", "raw scoring (\"template\": false) needs the prompt as a string")
            prompt = check_prompt_order(messages(item["prompt"], "prompt"), "prompt")
        else:
            prompt = text(item, "prompt")
        return PairText(prompt, text(item, "chosen"), text(item, "rejected"), template)
    except BadRow as bad:
        raise RequestError(422, f"{prefix}{bad.field}: {bad.detail}", f"{prefix}{bad.field}") from None


def parse_score_request(raw: bytes, max_pairs: int = MAX_PAIRS) -> tuple[list[PairText], bool]:
    """(pairs, is_batch) from a /v1/score body, or a RequestError naming the problem."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"invalid JSON: {err}") from None
    if isinstance(body, dict) and "pairs" in body:
        items = body["pairs"]
        if set(body) != {"pairs"}:
            raise RequestError(422, "a batch body has only 'pairs'; put prompt/chosen/rejected in each pair")
        if not isinstance(items, list) or not items:
            raise RequestError(422, "pairs: expected a non-empty list of pairs", "pairs")
        if len(items) > max_pairs:
            raise RequestError(422, f"pairs: {len(items)} pairs in one request; the limit is {max_pairs}, "
                                    f"split the batch", "pairs")
        return [_pair(item, f"pairs[{i}]") for i, item in enumerate(items)], True
    return [_pair(body, "")], False


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


def check_gguf(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ServeError(f"{path}: no such file; pass a .gguf written by `orpo merge-and-quantize`")
    if not is_gguf(path):
        raise ServeError(f"{path}: not a GGUF file (no GGUF magic); pass a .gguf written by "
                         f"`orpo merge-and-quantize`")
    return path


def create_app(model_path: str | Path, *, api_key: str | None = None, n_ctx: int = 4096, n_threads: int | None = None,
               max_pairs: int = MAX_PAIRS, max_body_bytes: int = MAX_BODY_BYTES):
    from llama_cpp.server import app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model_path = check_gguf(model_path)
    threads = n_threads or max(1, os.cpu_count() or 1)  # llama-cpp's default is half the cores
    try:
        app = llama_app.create_app(
            server_settings=ServerSettings(api_key=api_key, interrupt_requests=False),
            model_settings=[ModelSettings(model=str(model_path), model_alias=model_path.name, n_ctx=n_ctx,
                                          n_threads=threads, n_threads_batch=threads, verbose=False)])
    except (ValueError, RuntimeError) as err:
        raise ServeError(f"{model_path}: llama.cpp could not load it ({err})") from None
    tokenizers: dict[int, GGUFTokenizer] = {}

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            return _error(400, f"invalid Content-Length {length!r}")
        if length is not None and int(length) > max_body_bytes:
            return _error(413, f"request body over {max_body_bytes} bytes")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_path.name}

    @app.post("/v1/score", dependencies=[Depends(llama_app.authenticate)])
    async def score(request: Request):
        raw = await request.body()
        if len(raw) > max_body_bytes:  # a chunked body has no content-length to check up front
            return _error(413, f"request body over {max_body_bytes} bytes")
        try:
            pairs, batch = parse_score_request(raw, max_pairs)
        except RequestError as err:
            return _error(err.status, err.message, err.param)
        async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)() as proxy:
            llm = proxy(None)
            tokenizer = tokenizers.setdefault(id(llm), GGUFTokenizer(llm))
            try:
                results = await run_in_threadpool(_score_all, LlamaCppScorer(llm), tokenizer, pairs, batch)
            except ScoreError as err:
                return _error(422, str(err))
        return {"results": results} if batch else results[0]

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    return app


def _score_all(scorer, tokenizer, pairs: list[PairText], batch: bool) -> list[dict]:
    results = []
    for i, pair in enumerate(pairs):
        try:
            results.append(score_pair(scorer, tokenizer, pair))
        except ScoreError as err:
            raise ScoreError(f"pairs[{i}]: {err}" if batch else str(err)) from None
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(model: str | Path, *args: str, env: dict | None = None, log: Path | None = None, timeout: float = 300):
    """`orpo serve MODEL ARGS` in a subprocess on a free loopback port for the duration of the
    block; yields its base URL. For the demo, benchmarks and tests."""
    import httpx

    own_log = log is None
    log = Path(tempfile.mkstemp(prefix="orpo-serve-", suffix=".log")[1]) if own_log else Path(log)
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "orpo"), "serve", str(model), "--port", str(port),
                                 *args], env=env or os.environ, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while not _healthy(httpx, url):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"`orpo serve {model}` did not come up: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if own_log:
            log.unlink(missing_ok=True)


def _healthy(httpx, url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False

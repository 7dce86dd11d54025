"""`orpo serve`: llama-cpp-python's OpenAI-compatible server plus GET /health and POST /v1/score.

The app is llama_cpp.server's own (chat, completions, models, with its API-key check); we add
two routes and a guard in front of every route: a Host allow-list (DNS rebinding), CORS only for
named origins, a body-size limit, the API key on the docs too, and grammars checked in a child
process before llama.cpp's parser sees them in ours (a bad one crashed the server). Scoring takes the same lock as generation, because a Llama is
not thread-safe: requests are served in turn, in arrival order (asyncio's lock is FIFO), so a
long chat stream delays a score request until it ends but never starves it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from orpo_plugin.core.formats import BadRow, check_prompt_order, messages, text
from serve import llama
from serve.scoring import GGUFTokenizer, LlamaCppScorer, PairText, ScoreError, score_pair

MAX_PAIRS = 64  # per /v1/score request
MAX_BODY_BYTES = 1 << 20
# Host names served by default: a page on another name that resolves here (DNS rebinding) is refused.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
DOCS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
GRAMMAR_ROUTES = {"/v1/chat/completions", "/v1/completions"}
PAIR_FIELDS = {"prompt", "chosen", "rejected", "template"}


class ServeError(ValueError):
    """llama.cpp cannot load the model; exits the CLI with a message."""


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


def host_name(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _grammar(raw: bytes) -> str | None:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None  # the route itself answers a body that is not JSON
    grammar = body.get("grammar") if isinstance(body, dict) else None
    return grammar if isinstance(grammar, str) else None


def create_app(model_path: str | Path, *, api_key: str | None = None, n_ctx: int = 4096, n_threads: int | None = None,
               max_pairs: int = MAX_PAIRS, max_body_bytes: int = MAX_BODY_BYTES,
               allowed_hosts: tuple[str, ...] = LOCAL_HOSTS, cors_origins: tuple[str, ...] = ()):
    """The app. Only requests whose Host header names one of allowed_hosts ("*": any) are served;
    CORS is off unless cors_origins names the origins whose pages may call it."""
    from llama_cpp.server import app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model_path = llama.check_gguf(model_path)
    llama.check_version()
    settings = llama.settings(model_path, n_ctx, n_threads)
    settings["model"] = settings.pop("model_path")
    try:
        app = llama_app.create_app(
            server_settings=ServerSettings(api_key=api_key, interrupt_requests=False),
            model_settings=[ModelSettings(model_alias=model_path.name, **settings)])
    except (ValueError, RuntimeError) as err:
        raise ServeError(f"{model_path}: llama.cpp could not load it ({err})") from None
    scorers: dict[int, tuple[LlamaCppScorer, GGUFTokenizer]] = {}  # per loaded model, built once
    llama.without_cors(app)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    hosts = {host_name(h) for h in allowed_hosts}
    grammar_error = functools.lru_cache(maxsize=256)(lambda grammar: llama.grammar_error(model_path, grammar))

    def authorized(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = host_name(request.headers.get("host", ""))
        if "*" not in hosts and host not in hosts:
            return _error(400, f"Host {host!r} is not served; start `orpo serve` with --allowed-host {host or 'NAME'} "
                               f"to serve it", "host")
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            return _error(400, f"invalid Content-Length {length!r}")
        if length is not None and int(length) > max_body_bytes:
            return _error(413, f"request body over {max_body_bytes} bytes")
        if request.url.path in DOCS and not authorized(request):
            return _error(401, "this route needs the API key: Authorization: Bearer KEY")
        if request.method == "POST" and request.url.path in GRAMMAR_ROUTES and authorized(request):
            grammar = _grammar(await request.body())
            if grammar is not None and (why := await run_in_threadpool(grammar_error, grammar)):
                return _error(422, f"grammar: {why}", "grammar")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_path.name}

    @app.post("/v1/score", dependencies=[Depends(llama_app.authenticate)])
    async def score(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _error(415, "send the body as JSON with Content-Type: application/json")
        raw = await request.body()
        if len(raw) > max_body_bytes:  # a chunked body has no content-length to check up front
            return _error(413, f"request body over {max_body_bytes} bytes")
        try:
            pairs, batch = parse_score_request(raw, max_pairs)
        except RequestError as err:
            return _error(err.status, err.message, err.param)
        async with llama.server_model() as proxy:
            llm = proxy(None)
            if id(llm) not in scorers:
                scorers[id(llm)] = LlamaCppScorer(llm), GGUFTokenizer(llm)
            try:
                results = await run_in_threadpool(_score_all, *scorers[id(llm)], pairs, batch)
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

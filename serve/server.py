"""`orpo serve`: OpenAI-compatible chat and completions on a GGUF, plus POST /v1/score.

Our own FastAPI app over one llama_cpp.Llama (llama-cpp-python's server crashed on bad grammars,
answered validation errors with 500s, read chunked bodies without limit and kept generating for
clients long gone). What stands between a client and the model, in order:
1. `Guard`, an ASGI middleware: the Host header must name a served host (DNS rebinding); the API
   key is checked before any body is read; the body is read with a size limit (chunked too) and
   a time limit, must be UTF-8 JSON no deeper than MAX_DEPTH with no lone surrogates, and is then
   replayed to the app. Its refusals close the connection.
2. CORS, only for the origins named with --cors-origin.
3. The routes validate with serve.api's models (a 422 naming the field) and their own checks
   (context size, token ids, grammars parsed by llama.cpp in a child process, whose parser can
   crash).
4. `Engine`: one request at a time on the model, in arrival order (asyncio's lock is FIFO), in a
   worker thread that stops at the next token once the client leaves, the request's deadline
   passes or the server shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from orpo_plugin.core.formats import BadRow, check_prompt_order, messages, text
from orpo_plugin.core.tokenize import encode_prompts
from serve import api, llama
from serve.generate import Outcome, Sampling, complete, generate
from serve.scoring import (
    GGUFTokenizer,
    LlamaCppScorer,
    SEQUENCES,
    PairText,
    ScoreError,
    encode_pairs,
    pack_results,
)

MAX_PAIRS = 64  # per /v1/score request
MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 64  # JSON nesting
READ_TIMEOUT = 30.0  # seconds for a request body to arrive
REQUEST_TIMEOUT = 600.0  # seconds a generation may run; it then ends with finish_reason "length"
# Host names served by default: a page on another name that resolves here (DNS rebinding) is refused.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
OPEN_ROUTES = {"/health"}
PAIR_FIELDS = {"prompt", "chosen", "rejected", "template"}
ERRORS = {status: {"model": api.Error} for status in (400, 401, 408, 413, 415, 422)}


class ServeError(ValueError):
    """llama.cpp cannot load the model; exits the CLI with a message."""


class RequestError(ValueError):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


# -- /v1/score bodies: core's own checks, the messages dataset rows get --------------------------
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


def parse_score_request(body, max_pairs: int = MAX_PAIRS) -> tuple[list[PairText], bool]:
    """(pairs, is_batch) from a /v1/score body (parsed JSON), or a RequestError naming the problem."""
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


# -- the guard -----------------------------------------------------------------------------------
def host_name(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_json(raw: bytes):
    """The parsed body, or a RequestError: not UTF-8, not JSON, nested deeper than MAX_DEPTH, or a
    string with a lone surrogate (JSON allows "\\ud800"; nothing downstream can encode it)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RequestError(400, f"the body is not UTF-8 (byte {err.start}: {err.reason})") from None
    except json.JSONDecodeError as err:
        raise RequestError(400, f"invalid JSON: {err}") from None
    except RecursionError:
        raise RequestError(400, f"JSON nested deeper than {MAX_DEPTH} levels") from None
    todo = [(body, 0, "body")]
    while todo:
        value, depth, where = todo.pop()
        if depth > MAX_DEPTH:
            raise RequestError(400, f"JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise RequestError(400, f"{where}: a key has a lone surrogate (\\ud800-\\udfff); send UTF-8 text")
                todo.append((item, depth + 1, key if where == "body" else f"{where}.{key}"))
        elif isinstance(value, list):
            todo.extend((item, depth + 1, f"{'' if where == 'body' else where}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, str) and _SURROGATE.search(value):
            raise RequestError(400, f"{where}: a string with a lone surrogate (\\ud800-\\udfff); send UTF-8 text",
                               where)
    return body


class Guard:
    """Host allow-list, API key, bounded body: see the module's docstring."""

    def __init__(self, app, *, hosts: set[str], api_key: str | None, max_body_bytes: int, read_timeout: float):
        self.app, self.hosts, self.api_key = app, hosts, api_key
        self.max_body_bytes, self.read_timeout = max_body_bytes, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            receive = await self._check(scope, receive)
        except RequestError as err:
            headers = {"Connection": "close"}
            if err.status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            return await _error(err.status, err.message, err.param, headers)(scope, receive, send)
        await self.app(scope, receive, send)

    async def _check(self, scope, receive):
        headers = Headers(scope=scope)
        host = host_name(headers.get("host", ""))
        if "*" not in self.hosts and host not in self.hosts:
            raise RequestError(400, f"Host {host!r} is not served; start `orpo serve` with --allowed-host "
                                    f"{host or 'NAME'} to serve it", "host")
        if scope["method"] == "OPTIONS":
            return receive  # CORS preflight: answered by CORS (or 405) without a body
        if scope["path"] not in OPEN_ROUTES and self.api_key is not None and not hmac.compare_digest(
                headers.get("authorization", "").encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError(401, "this route needs the API key: send the header Authorization: Bearer KEY")
        if scope["method"] != "POST":
            return receive
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "send the body as JSON with the header Content-Type: application/json")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            raise RequestError(400, f"invalid Content-Length {length!r}")
        if length is not None and int(length) > self.max_body_bytes:
            raise RequestError(413, f"request body over {self.max_body_bytes} bytes")
        raw = await self._body(receive)
        if not raw:
            raise RequestError(400, "the request has no body; send a JSON object")
        scope.setdefault("state", {})["json"] = check_json(raw)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        return replay

    async def _body(self, receive) -> bytes:
        chunks, size = [], 0
        deadline = time.monotonic() + self.read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RequestError(408, f"the request body did not arrive within {self.read_timeout:g} s") from None
            if message["type"] == "http.disconnect":
                raise RequestError(400, "the client left before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise RequestError(413, f"request body over {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


# -- the model ------------------------------------------------------------------------------------
class Engine:
    """The one model. `run` lends it to a function in a worker thread, one request at a time in
    arrival order; if the waiting request is cancelled (client gone, shutdown), the function's
    stop event is set, and the model is lent again only after the function returned."""

    def __init__(self, llm, name: str, request_timeout: float, score_batch: int | None = None):
        self.llm, self.name, self.request_timeout = llm, name, request_timeout
        self.lock = asyncio.Lock()
        self.closing = threading.Event()
        self.tokenizer = GGUFTokenizer(llm)
        self.scorer = LlamaCppScorer(llm, pack_tokens=score_batch)

    def stopper(self, stop: threading.Event) -> Callable[[], bool]:
        """True once stop is set, the server is closing, or request_timeout has passed from now."""
        deadline = time.monotonic() + self.request_timeout
        return lambda: stop.is_set() or self.closing.is_set() or time.monotonic() > deadline

    async def start(self, work: Callable[[], object]) -> asyncio.Future:
        """work() in a worker thread once the requests before this one are done; the model is lent
        again when work returns, whether or not its client is still reading."""
        await self.lock.acquire()
        try:
            future = asyncio.get_running_loop().run_in_executor(None, self._guarded, work)
        except BaseException:
            self.lock.release()
            raise
        future.add_done_callback(lambda _: self.lock.release())
        return future

    async def run(self, work: Callable[[], object], stop: threading.Event):
        return await _settle(await self.start(work), stop)

    def _guarded(self, work):
        try:
            return work()
        except BaseException:
            llama.KVCache(self.llm).clear()  # a failed decode may leave the cache half-written
            raise


async def _settle(future: asyncio.Future, stop: threading.Event):
    """The worker's result. If this task is cancelled meanwhile, ask the worker to stop, wait
    until it has (the model is not lent again before), then let the cancellation through."""
    cancelled = None
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError as err:
            stop.set()
            cancelled = err
    if cancelled is not None:
        raise cancelled
    return future.result()


async def _set_on_disconnect(request: Request, stop: threading.Event) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stop.set()


# -- requests into prompts and settings ------------------------------------------------------------
def _loc(loc) -> str:
    """A pydantic error location as a field path: ("body", "messages", 0, "role") -> messages[0].role;
    union-branch tags (str, list[...], TextPart) are left out."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[a-z_][a-z0-9_]*", part) and part not in ("str", "int", "float", "bool"):
            out += f".{part}" if out else part
    return out


def _message(i: int, message: api.Message) -> dict:
    where = f"messages[{i}]"
    content = message.content
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, api.OtherPart):
                if part.type == "text":
                    raise RequestError(422, f"{where}.content[{j}].text: missing", f"{where}.content[{j}].text")
                raise RequestError(422, f"{where}.content[{j}]: {part.type!r} parts are not supported, this model "
                                        f"reads text only; send text parts or a string", f"{where}.content[{j}]")
        content = "\n".join(part.text for part in content)  # as vLLM joins text parts for string templates
    if content is None:
        if message.role != "assistant":
            raise RequestError(422, f"{where}.content: a {message.role} message needs content", f"{where}.content")
        content = ""  # an assistant turn that only called tools
    out = {"role": "system" if message.role == "developer" else message.role, "content": content}
    for key in ("name", "tool_calls", "tool_call_id"):
        if getattr(message, key) is not None:
            out[key] = getattr(message, key)
    return out


def chat_prompt(tokenizer: GGUFTokenizer, request: api.ChatRequest) -> list[int]:
    """The chat's tokens as training made prompts: the GGUF's chat template with the generation
    prompt, then core.tokenize's encoding (its BOS once)."""
    if not tokenizer.chat_template:
        raise RequestError(422, "messages: the model has no chat template; use /v1/completions", "messages")
    chat = [_message(i, m) for i, m in enumerate(request.messages)]
    try:
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tools=request.tools)
    except Exception as err:  # the template's own raise_exception, or its code failing on these messages
        raise RequestError(422, f"messages: the model's chat template cannot render them ({err})",
                           "messages") from None
    return encode_prompts(tokenizer, [rendered])[0]


def completion_prompt(engine: Engine, request: api.CompletionRequest) -> tuple[list[int], str]:
    prompt = request.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        tokens = engine.tokenizer(prompt)["input_ids"]
        if not tokens:
            raise RequestError(422, "prompt: empty; send some text", "prompt")
        return tokens, prompt
    n_vocab = engine.llm.n_vocab()
    for i, token in enumerate(prompt):
        if token >= n_vocab:
            raise RequestError(422, f"prompt[{i}]: token id {token} is not in the vocabulary (0 to {n_vocab - 1})",
                               f"prompt[{i}]")
    return prompt, engine.llm.detokenize(prompt).decode("utf-8", errors="replace")


def _max_tokens(engine: Engine, prompt: list[int], asked: int | None, where: str) -> int:
    room = engine.llm.n_ctx() - len(prompt)
    if room < 1:
        raise RequestError(422, f"{where}: the prompt is {len(prompt)} tokens and the context holds "
                                f"{engine.llm.n_ctx()}; shorten it or restart with a larger --n-ctx", where)
    if asked is not None and asked > room:
        raise RequestError(422, f"max_tokens: {asked} tokens do not fit after the {len(prompt)}-token prompt "
                                f"(context {engine.llm.n_ctx()}); ask for at most {room}", "max_tokens")
    return asked or room


def _grammar(request) -> str | None:
    response_format = getattr(request, "response_format", None)
    if response_format is None or response_format.type == "text":
        return request.grammar
    if request.grammar is not None:
        raise RequestError(422, "grammar: give a grammar or a response_format, not both", "grammar")
    if response_format.type == "json_object" or not response_format.json_schema:
        return llama.JSON_GRAMMAR
    try:
        return llama.json_schema_grammar(response_format.json_schema.schema_)
    except Exception as err:  # llama-cpp-python's converter raises whatever it meets
        raise RequestError(422, f"response_format.json_schema.schema: cannot be turned into a grammar ({err})",
                           "response_format.json_schema.schema") from None


def sampling(request, n_vocab: int, grammar: str | None) -> Sampling:
    if getattr(request, "logprobs", None) or getattr(request, "top_logprobs", None):
        raise RequestError(422, "logprobs: not supported by orpo serve; POST /v1/score gives the log-probs of "
                                "answers you name", "logprobs")
    if getattr(request, "suffix", None) is not None:
        raise RequestError(422, "suffix: not supported (no fill-in-the-middle)", "suffix")
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= n_vocab:
            raise RequestError(422, f"logit_bias: {key!r} is not a token id (0 to {n_vocab - 1})", "logit_bias")
        bias[int(key)] = value
    return Sampling(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, min_p=request.min_p,
                    typical_p=request.typical_p, repeat_penalty=request.repeat_penalty,
                    presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                    seed=request.seed, grammar=grammar, logit_bias=bias)


def _stops(request) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


# -- the app ----------------------------------------------------------------------------------------
def _sse(event) -> str:
    return f"data: {event.model_dump_json()}\n\n"


def create_app(model_path: str | Path, *, api_key: str | None = None, n_ctx: int = 4096, n_threads: int | None = None,
               max_pairs: int = MAX_PAIRS, max_body_bytes: int = MAX_BODY_BYTES,
               allowed_hosts: tuple[str, ...] = LOCAL_HOSTS, cors_origins: tuple[str, ...] = (),
               read_timeout: float = READ_TIMEOUT, request_timeout: float = REQUEST_TIMEOUT,
               score_batch: int | None = None) -> FastAPI:
    """The app. Only requests whose Host header names one of allowed_hosts ("*": any) are served;
    CORS is off unless cors_origins names the origins whose pages may call it. score_batch: tokens
    per scoring batch (LlamaCppScorer's pack_tokens); other requests wait at most one batch."""
    model_path = llama.check_gguf(model_path)
    llama.check_version()
    try:
        llm = llama.open_gguf(model_path, n_ctx, n_threads, sequences=SEQUENCES)
    except (ValueError, RuntimeError) as err:
        raise ServeError(f"{model_path}: llama.cpp could not load it ({err})") from None
    engine = Engine(llm, model_path.name, request_timeout, score_batch)
    created = int(model_path.stat().st_mtime)
    grammar_error = functools.lru_cache(maxsize=256)(lambda grammar: llama.grammar_error(model_path, grammar))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        """At shutdown, running generations stop at their next token. The model stays loaded (an
        ASGI test client starts and stops an app many times); the process's end frees it."""
        engine.closing.clear()
        yield
        engine.closing.set()
        async with engine.lock:  # the last generation has stopped
            pass

    app = FastAPI(title="orpo serve", summary="OpenAI-compatible chat on a GGUF, and chosen-vs-rejected scoring",
                  lifespan=lifespan)
    architecture = llm.metadata.get("general.architecture", "")
    app.state.trained_context = int(llm.metadata.get(f"{architecture}.context_length", 0))

    async def prepared(request, prompt_of):
        """(prompt_of(), the sampling settings), or a RequestError; the grammar checked first."""
        grammar = _grammar(request)
        if grammar is not None and (why := await run_in_threadpool(grammar_error, grammar)):
            raise RequestError(422, f"grammar: {why}", "grammar")
        prompt = await run_in_threadpool(prompt_of)  # tokenizing reads only the vocabulary: no lock
        return prompt, sampling(request, llm.n_vocab(), grammar)

    def answer_stream(prompt, max_tokens, settings, stops, chunk, last_chunks, first=()):
        """The SSE events of a streamed generation: first, chunk(piece) per piece, last_chunks(outcome), [DONE]."""

        async def events():
            for event in first:
                yield _sse(event)
            stop, loop, queue = threading.Event(), asyncio.get_running_loop(), asyncio.Queue()
            outcome, done = Outcome(), object()

            def work():
                try:
                    for piece in generate(llm, prompt, max_tokens, stops, settings, engine.stopper(stop), outcome):
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                finally:
                    loop.call_soon_threadsafe(queue.put_nowait, done)

            future = await engine.start(work)
            try:
                while (piece := await queue.get()) is not done:
                    yield _sse(chunk(piece))
            finally:
                stop.set()  # the client left (or the stream failed): the worker stops at its next token
                await _settle(future, stop)
            for event in last_chunks(outcome):
                yield _sse(event)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def run_to_end(http: Request, prompt, max_tokens, settings, stops) -> Outcome:
        stop = threading.Event()
        watcher = asyncio.create_task(_set_on_disconnect(http, stop))

        def work():
            return complete(llm, prompt, max_tokens, stop=stops, sampling=settings,
                            stop_requested=engine.stopper(stop))

        try:
            return await engine.run(work, stop)
        finally:
            watcher.cancel()

    def usage(outcome: Outcome) -> api.Usage:
        return api.Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                         total_tokens=outcome.prompt_tokens + outcome.completion_tokens)

    def finish(outcome: Outcome) -> str:
        return "stop" if outcome.finish_reason == "stop" else "length"  # a deadline cut it short

    @app.get("/health", response_model=api.Health)
    async def health():
        return api.Health(status="ok", model=engine.name)

    @app.get("/v1/models", response_model=api.ModelList, responses=ERRORS)
    async def models():
        return api.ModelList(data=[api.ModelCard(id=engine.name, created=created)])

    @app.post("/v1/chat/completions", response_model=api.ChatCompletion, responses={
        **ERRORS, 200: _events("ChatCompletionChunk")})
    async def chat_completions(body: api.ChatRequest, http: Request):
        prompt, settings = await prepared(body, lambda: chat_prompt(engine.tokenizer, body))
        max_tokens = _max_tokens(engine, prompt, body.max_completion_tokens or body.max_tokens, "messages")
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(piece, role=None):
                return api.ChatCompletionChunk(id=ident, created=now, model=engine.name, choices=[
                    api.ChunkChoice(delta=api.Delta(role=role, content=piece))])

            def last(outcome):
                yield api.ChatCompletionChunk(id=ident, created=now, model=engine.name, choices=[
                    api.ChunkChoice(delta=api.Delta(), finish_reason=finish(outcome))])
                if body.stream_options and body.stream_options.include_usage:
                    yield api.ChatCompletionChunk(id=ident, created=now, model=engine.name, choices=[],
                                                  usage=usage(outcome))

            return answer_stream(prompt, max_tokens, settings, _stops(body), chunk, last,
                                 first=[chunk("", role="assistant")])
        outcome = await run_to_end(http, prompt, max_tokens, settings, _stops(body))
        return api.ChatCompletion(id=ident, created=now, model=engine.name, usage=usage(outcome), choices=[
            api.ChatChoice(message=api.AssistantMessage(content=outcome.text), finish_reason=finish(outcome))])

    @app.post("/v1/completions", response_model=api.Completion, responses={
        **ERRORS, 200: _events("Completion")})
    async def completions(body: api.CompletionRequest, http: Request):
        (prompt, prompt_text), settings = await prepared(body, lambda: completion_prompt(engine, body))
        max_tokens = _max_tokens(engine, prompt, body.max_tokens, "prompt")
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def completion(piece, reason=None, outcome=None):
            return api.Completion(id=ident, created=now, model=engine.name, usage=outcome and usage(outcome),
                                  choices=[api.CompletionChoice(text=piece, finish_reason=reason)])

        if body.stream:
            def last(outcome):
                yield completion("", finish(outcome),
                                 outcome if body.stream_options and body.stream_options.include_usage else None)

            return answer_stream(prompt, max_tokens, settings, _stops(body), completion, last,
                                 first=[completion(prompt_text)] if body.echo else [])
        outcome = await run_to_end(http, prompt, max_tokens, settings, _stops(body))
        return completion(prompt_text + outcome.text if body.echo else outcome.text, finish(outcome), outcome)

    @app.post("/v1/score", response_model=api.PairScore | api.ScoreResults, responses=ERRORS, openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "anyOf": [{"$ref": "#/components/schemas/ScorePair"}, {"$ref": "#/components/schemas/ScoreBatch"}]}}}}})
    async def score(http: Request):
        """Log-probs of a chosen and a rejected answer after a prompt, as training computed them,
        and which the model prefers; {"pairs": [...]} scores up to --max-pairs in one request."""
        pairs, batch = parse_score_request(http.scope["state"]["json"], max_pairs)
        where = (lambda i: f"pairs[{i}]") if batch else None
        try:
            encoded = await engine.run(lambda: encode_pairs(engine.scorer, engine.tokenizer, pairs, where),
                                       threading.Event())
        except ScoreError as err:
            return _error(422, str(err))
        # Batch by batch, each its own turn with the model: requests that came meanwhile go between
        # two batches. A client that leaves stops the rest.
        stop, results = threading.Event(), [None] * len(pairs)
        watcher = asyncio.create_task(_set_on_disconnect(http, stop))
        try:
            for pack in engine.scorer.plan(encoded):
                if stop.is_set():
                    return _error(499, "the client closed the request")
                scored = await engine.run(lambda pack=pack: pack_results(engine.scorer, encoded, pack), stop)
                for i, result in zip(pack, scored):
                    results[i] = result
        finally:
            watcher.cancel()
        return {"results": results} if batch else results[0]

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        where = _loc(errors[0]["loc"]) if errors else ""
        reasons = list(dict.fromkeys(e["msg"] for e in errors if _loc(e["loc"]) == where))[:3]
        return _error(422, f"{where or 'body'}: {'; or '.join(reasons)}", where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return _error(500, f"the server failed on this request ({type(exc).__name__}); its log has the details",
                      headers={"Connection": "close"})

    _add_schemas(app)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, hosts={host_name(h) for h in allowed_hosts}, api_key=api_key,
                       max_body_bytes=max_body_bytes, read_timeout=read_timeout)
    return app


def _events(model: str) -> dict:
    """A 200 that streams (with "stream": true) server-sent events whose data is this model's JSON."""
    event = {"type": "object", "required": ["data"], "properties": {"event": {"type": "string"}, "data": {
        "type": "string", "contentMediaType": "application/json",
        "contentSchema": {"$ref": f"#/components/schemas/{model}"}}}}
    return {"description": f"the answer; with \"stream\": true, events whose data is a {model}, then "
                           f"`data: [DONE]`", "content": {"text/event-stream": {"schema": event}}}


def _add_schemas(app: FastAPI) -> None:
    """Put the models that no FastAPI body or response_model names into the OpenAPI components:
    /v1/score's requests (validated by core's checks) and the streamed chat events."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (api.ScorePair, api.ScoreBatch, api.ChatCompletionChunk):
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}))
                components[model.__name__] = definition
        return app.openapi_schema

    app.openapi = openapi



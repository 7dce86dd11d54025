"""The OpenAI-compatible surface of `orpo serve`: /v1/models, /v1/chat/completions and
/v1/completions, streamed (server-sent events) or not. A request becomes a prompt as training made
prompts (the GGUF's chat template, then core.tokenize's encoding) and llama.cpp sampling settings;
what the model cannot do (images, logprobs, fill-in-the-middle) is a 422 that says so."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from orpo_plugin.core.tokenize import encode_prompts
from serve import llama
from serve.serving import api
from serve.serving.engine import Engine, engine, set_on_disconnect, settle
from serve.serving.errors import RESPONSES, RequestError
from serve.serving.generate import Outcome, Sampling, complete, generate

router = APIRouter(responses=RESPONSES)


# -- requests into prompts and settings ------------------------------------------------------------
def _message(i: int, message: api.Message) -> dict:
    where = f"messages[{i}]"
    content = message.content
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, api.OtherPart):
                if part.type == "text":
                    raise RequestError(422, f"{where}.content[{j}].text: missing", f"{where}.content[{j}].text")
                raise RequestError(
                    422,
                    f"{where}.content[{j}]: {part.type!r} parts are not supported, this model "
                    f"reads text only; send text parts or a string",
                    f"{where}.content[{j}]",
                )
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


def chat_prompt(tokenizer, request: api.ChatRequest) -> list[int]:
    """The chat's tokens as training made prompts: the GGUF's chat template with the generation
    prompt, then core.tokenize's encoding (its BOS once)."""
    if not tokenizer.chat_template:
        raise RequestError(422, "messages: the model has no chat template; use /v1/completions", "messages")
    chat = [_message(i, m) for i, m in enumerate(request.messages)]
    try:
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tools=request.tools)
    except Exception as err:  # the template's own raise_exception, or its code failing on these messages
        raise RequestError(422, f"messages: the model's chat template cannot render them ({err})", "messages") from None
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
            raise RequestError(
                422, f"prompt[{i}]: token id {token} is not in the vocabulary (0 to {n_vocab - 1})", f"prompt[{i}]"
            )
    return prompt, engine.llm.detokenize(prompt).decode("utf-8", errors="replace")


def _max_tokens(engine: Engine, prompt: list[int], asked: int | None, where: str) -> int:
    room = engine.llm.n_ctx() - len(prompt)
    if room < 1:
        raise RequestError(
            422,
            f"{where}: the prompt is {len(prompt)} tokens and the context holds "
            f"{engine.llm.n_ctx()}; shorten it or restart with a larger --n-ctx",
            where,
        )
    if asked is not None and asked > room:
        raise RequestError(
            422,
            f"max_tokens: {asked} tokens do not fit after the {len(prompt)}-token prompt "
            f"(context {engine.llm.n_ctx()}); ask for at most {room}",
            "max_tokens",
        )
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
        raise RequestError(
            422,
            f"response_format.json_schema.schema: cannot be turned into a grammar ({err})",
            "response_format.json_schema.schema",
        ) from None


def sampling(request, n_vocab: int, grammar: str | None) -> Sampling:
    if getattr(request, "logprobs", None) or getattr(request, "top_logprobs", None):
        raise RequestError(
            422,
            "logprobs: not supported by orpo serve; POST /v1/score gives the log-probs of answers you name",
            "logprobs",
        )
    if getattr(request, "suffix", None) is not None:
        raise RequestError(422, "suffix: not supported (no fill-in-the-middle)", "suffix")
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= n_vocab:
            raise RequestError(422, f"logit_bias: {key!r} is not a token id (0 to {n_vocab - 1})", "logit_bias")
        bias[int(key)] = value
    return Sampling(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        typical_p=request.typical_p,
        repeat_penalty=request.repeat_penalty,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        seed=request.seed,
        grammar=grammar,
        logit_bias=bias,
    )


def _stops(request) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


# -- answers ----------------------------------------------------------------------------------------
async def prepared(engine: Engine, request, prompt_of):
    """(prompt_of(), the sampling settings), or a RequestError; the grammar checked first."""
    grammar = _grammar(request)
    if grammar is not None and (why := await engine.tokenize(lambda: engine.grammar_error(grammar))):
        raise RequestError(422, f"grammar: {why}", "grammar")
    prompt = await engine.tokenize(prompt_of)
    return prompt, sampling(request, engine.llm.n_vocab(), grammar)


def _sse(event) -> str:
    return f"data: {event.model_dump_json()}\n\n"


def answer_stream(engine: Engine, prompt, max_tokens, settings, stops, chunk, last_chunks, first=()):
    """The SSE events of a streamed generation: first, chunk(piece) per piece, last_chunks(outcome), [DONE]."""

    async def events():
        for event in first:
            yield _sse(event)
        stop, loop, queue = threading.Event(), asyncio.get_running_loop(), asyncio.Queue()
        outcome, done = Outcome(), object()

        def work():
            try:
                for piece in generate(engine.llm, prompt, max_tokens, stops, settings, engine.stopper(stop), outcome):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        future = await engine.start(work)
        try:
            while (piece := await queue.get()) is not done:
                yield _sse(chunk(piece))
        finally:
            stop.set()  # the client left (or the stream failed): the worker stops at its next token
            await settle(future, stop)
        for event in last_chunks(outcome):
            yield _sse(event)
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def run_to_end(engine: Engine, http: Request, prompt, max_tokens, settings, stops) -> Outcome:
    stop = threading.Event()
    watcher = asyncio.create_task(set_on_disconnect(http, stop))

    def work():
        return complete(
            engine.llm, prompt, max_tokens, stop=stops, sampling=settings, stop_requested=engine.stopper(stop)
        )

    try:
        return await engine.run(work, stop)
    finally:
        watcher.cancel()


def usage(outcome: Outcome) -> api.Usage:
    return api.Usage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
    )


def finish(outcome: Outcome) -> str:
    return "stop" if outcome.finish_reason == "stop" else "length"  # a deadline cut it short


def events_of(model: str) -> dict:
    """A 200 that streams (with "stream": true) server-sent events whose data is this model's JSON."""
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": f"#/components/schemas/{model}"},
            },
        },
    }
    return {
        "description": f'the answer; with "stream": true, events whose data is a {model}, then `data: [DONE]`',
        "content": {"text/event-stream": {"schema": event}},
    }


# -- routes -----------------------------------------------------------------------------------------
@router.get("/v1/models", response_model=api.ModelList)
async def models(engine: Engine = Depends(engine)):
    return api.ModelList(data=[api.ModelCard(id=engine.name, created=engine.created)])


@router.post(
    "/v1/chat/completions", response_model=api.ChatCompletion, responses={200: events_of("ChatCompletionChunk")}
)
async def chat_completions(body: api.ChatRequest, http: Request, engine: Engine = Depends(engine)):
    prompt, settings = await prepared(engine, body, lambda: chat_prompt(engine.tokenizer, body))
    max_tokens = _max_tokens(engine, prompt, body.max_completion_tokens or body.max_tokens, "messages")
    ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:

        def chunk(piece, role=None):
            return api.ChatCompletionChunk(
                id=ident,
                created=now,
                model=engine.name,
                choices=[api.ChunkChoice(delta=api.Delta(role=role, content=piece))],
            )

        def last(outcome):
            yield api.ChatCompletionChunk(
                id=ident,
                created=now,
                model=engine.name,
                choices=[api.ChunkChoice(delta=api.Delta(), finish_reason=finish(outcome))],
            )
            if body.stream_options and body.stream_options.include_usage:
                yield api.ChatCompletionChunk(
                    id=ident, created=now, model=engine.name, choices=[], usage=usage(outcome)
                )

        return answer_stream(
            engine, prompt, max_tokens, settings, _stops(body), chunk, last, first=[chunk("", role="assistant")]
        )
    outcome = await run_to_end(engine, http, prompt, max_tokens, settings, _stops(body))
    return api.ChatCompletion(
        id=ident,
        created=now,
        model=engine.name,
        usage=usage(outcome),
        choices=[api.ChatChoice(message=api.AssistantMessage(content=outcome.text), finish_reason=finish(outcome))],
    )


@router.post("/v1/completions", response_model=api.Completion, responses={200: events_of("Completion")})
async def completions(body: api.CompletionRequest, http: Request, engine: Engine = Depends(engine)):
    (prompt, prompt_text), settings = await prepared(engine, body, lambda: completion_prompt(engine, body))
    max_tokens = _max_tokens(engine, prompt, body.max_tokens, "prompt")
    ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def completion(piece, reason=None, outcome=None):
        return api.Completion(
            id=ident,
            created=now,
            model=engine.name,
            usage=outcome and usage(outcome),
            choices=[api.CompletionChoice(text=piece, finish_reason=reason)],
        )

    if body.stream:

        def last(outcome):
            yield completion(
                "", finish(outcome), outcome if body.stream_options and body.stream_options.include_usage else None
            )

        return answer_stream(
            engine,
            prompt,
            max_tokens,
            settings,
            _stops(body),
            completion,
            last,
            first=[completion(prompt_text)] if body.echo else [],
        )
    outcome = await run_to_end(engine, http, prompt, max_tokens, settings, _stops(body))
    return completion(prompt_text + outcome.text if body.echo else outcome.text, finish(outcome), outcome)

"""`orpo serve`: OpenAI-compatible chat and completions on a GGUF, plus POST /v1/score.

Our own FastAPI app over one llama_cpp.Llama (llama-cpp-python's server crashed on bad grammars,
answered validation errors with 500s, read chunked bodies without limit and kept generating for
clients long gone). What stands between a client and the model, in order:
1. `guard.Guard`, an ASGI middleware: Host allow-list, API key, a bounded UTF-8 JSON body.
2. CORS, only for the origins named with --cors-origin.
3. The routers (routes/: OpenAI-compatible, score, health and docs), which validate with api's
   models (a 422 naming the field, errors.py's one style) and their own checks (context size,
   token ids, grammars parsed by llama.cpp in a child process, whose parser can crash).
4. `engine.Engine`, held in the app's state: one request at a time on the model, in arrival
   order, in a worker thread that stops at the next token once the client leaves, the request's
   deadline passes or the server shuts down.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastapi import FastAPI

from serve.serving import errors
from serve.serving.engine import Engine, ServeError
from serve.serving.guard import Guard, host_name
from serve.serving.limits import LOCAL_HOSTS, MAX_BODY_BYTES, MAX_PAIRS, READ_TIMEOUT, REQUEST_TIMEOUT
from serve.serving.routes import health, openai, score

__all__ = ["LOCAL_HOSTS", "ServeError", "create_app"]


def create_app(
    model_path: str | Path,
    *,
    api_key: str | None = None,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    max_pairs: int = MAX_PAIRS,
    max_body_bytes: int = MAX_BODY_BYTES,
    allowed_hosts: tuple[str, ...] = LOCAL_HOSTS,
    cors_origins: tuple[str, ...] = (),
    read_timeout: float = READ_TIMEOUT,
    request_timeout: float = REQUEST_TIMEOUT,
    score_batch: int | None = None,
) -> FastAPI:
    """The app. Only requests whose Host header names one of allowed_hosts ("*": any) are served;
    CORS is off unless cors_origins names the origins whose pages may call it. score_batch: tokens
    per scoring batch (LlamaCppScorer's pack_tokens); other requests wait at most one batch."""
    engine = Engine(model_path, n_ctx, n_threads, request_timeout, max_pairs, score_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        """At shutdown, running generations stop at their next token. The model stays loaded (an
        ASGI test client starts and stops an app many times); the process's end frees it."""
        engine.closing.clear()
        yield
        engine.closing.set()
        async with engine.lock:  # the last generation has stopped
            pass

    app = FastAPI(
        title="orpo serve",
        summary="OpenAI-compatible chat on a GGUF, and chosen-vs-rejected scoring",
        lifespan=lifespan,
    )
    app.state.engine = engine
    architecture = engine.llm.metadata.get("general.architecture", "")
    app.state.trained_context = int(engine.llm.metadata.get(f"{architecture}.context_length", 0))
    for router in (health.router, openai.router, score.router):
        app.include_router(router)
    errors.install(app)
    health.add_schemas(app)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(
        Guard,
        hosts={host_name(h) for h in allowed_hosts},
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        read_timeout=read_timeout,
    )
    return app

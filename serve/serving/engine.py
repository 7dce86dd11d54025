"""`Engine`: the one model behind `orpo serve`, held in the app's state. Requests take turns on it,
one at a time in arrival order (asyncio's lock is FIFO), in a worker thread that stops at the next
token once the client leaves, the request's deadline passes or the server shuts down.
Tokenizing reads only the vocabulary, so every route tokenizes outside the turns (`tokenize`)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from orpo_plugin.core.errors import OrpoError
from serve import llama
from serve.scoring import SEQUENCES, LlamaCppScorer
from serve.tokenizer import GGUFTokenizer


class ServeError(OrpoError, ValueError):
    """llama.cpp cannot load the model; exits the CLI with a message."""


class Engine:
    """The model, its tokenizer and scorer, and the settings every route reads. `run` lends the
    model to a function in a worker thread, one request at a time in arrival order; if the waiting
    request is cancelled (client gone, shutdown), the function's stop event is set, and the model is
    lent again only after the function returned."""

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int,
        n_threads: int | None,
        request_timeout: float,
        max_pairs: int,
        score_batch: int | None = None,
    ):
        model_path = llama.check_gguf(model_path)
        llama.check_version()  # its own message, not "could not load"
        try:
            self.llm = llama.open_gguf(model_path, n_ctx, n_threads, sequences=SEQUENCES)
        except (ValueError, RuntimeError) as err:
            raise ServeError(f"{model_path}: llama.cpp could not load it ({err})") from None
        self.name, self.created = model_path.name, int(model_path.stat().st_mtime)
        self.request_timeout, self.max_pairs = request_timeout, max_pairs
        self.lock = asyncio.Lock()
        self.closing = threading.Event()
        self.tokenizer = GGUFTokenizer(self.llm)
        self.scorer = LlamaCppScorer(self.llm, pack_tokens=score_batch)
        self.grammar_error = functools.lru_cache(maxsize=256)(lambda grammar: llama.grammar_error(model_path, grammar))

    async def tokenize(self, work: Callable[[], object]):
        """work() (tokenizing, rendering templates) in a worker thread, without waiting for a turn."""
        return await run_in_threadpool(work)

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
        return await settle(await self.start(work), stop)

    def _guarded(self, work):
        try:
            return work()
        except BaseException:
            llama.KVCache(self.llm).clear()  # a failed decode may leave the cache half-written
            raise


def engine(request: Request) -> Engine:
    """The app's engine (a FastAPI dependency)."""
    return request.app.state.engine


async def settle(future: asyncio.Future, stop: threading.Event):
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


async def set_on_disconnect(request: Request, stop: threading.Event) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stop.set()

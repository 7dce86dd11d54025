"""POST /v1/score: the log-probs of a chosen and a rejected answer after a prompt, as training
computed them, and which the model prefers; {"pairs": [...]} scores up to --max-pairs in one
request. The body is validated by api.ScoreBody (core's checks, the ones dataset rows get)."""

from __future__ import annotations

import asyncio
import threading

from fastapi import APIRouter, Depends, Request

from serve.scoring import PairText, fitting_pair_ids, pack_results
from serve.serving import api
from serve.serving.engine import Engine, engine, set_on_disconnect
from serve.serving.errors import RESPONSES, RequestError

router = APIRouter(responses=RESPONSES)


@router.post("/v1/score", response_model=api.PairScore | api.ScoreResults)
async def score(body: api.ScoreBody, http: Request, engine: Engine = Depends(engine)):
    """Log-probs of a chosen and a rejected answer after a prompt, as training computed them,
    and which the model prefers; {"pairs": [...]} scores up to --max-pairs in one request."""
    batch = isinstance(body, api.ScoreBatch)
    items = body.pairs if batch else [body]
    if len(items) > engine.max_pairs:
        raise RequestError(
            422, f"pairs: {len(items)} pairs in one request; the limit is {engine.max_pairs}, split the batch", "pairs"
        )
    pairs = [
        PairText(
            item.prompt if isinstance(item.prompt, str) else [m.model_dump() for m in item.prompt],
            item.chosen,
            item.rejected,
            item.template,
        )
        for item in items
    ]
    where = (lambda i: f"pairs[{i}]") if batch else None
    encoded = await engine.tokenize(lambda: fitting_pair_ids(engine.scorer, engine.tokenizer, pairs, where))
    # Pack by pack, each its own turn with the model: requests that came meanwhile go between two
    # packs. A client that leaves stops the rest.
    stop, results = threading.Event(), [None] * len(pairs)
    watcher = asyncio.create_task(set_on_disconnect(http, stop))
    try:
        for pack in engine.scorer.plan(encoded):
            if stop.is_set():
                raise RequestError(400, "the client closed the request before its pairs were scored")
            scored = await engine.run(lambda pack=pack: pack_results(engine.scorer, encoded, pack), stop)
            for i, result in zip(pack, scored):
                results[i] = result
    finally:
        watcher.cancel()
    return {"results": results} if batch else results[0]

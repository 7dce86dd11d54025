"""One error style for every route and the guard: an OpenAI-shaped body {"error": {message, type,
param, code}} whose message names the field and the fix. Routes raise RequestError; validation
errors (pydantic's, and core's checks run inside the request models) become a 422 naming the
field; anything unexpected is a 500 that says where the details are."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from orpo_plugin.core.errors import OrpoError
from serve.scoring import ScoreError
from serve.serving import api

# The 4xx answers every route can give, for the OpenAPI schema.
RESPONSES = {status: {"model": api.Error} for status in (400, 401, 408, 413, 415, 422)}


class RequestError(OrpoError, ValueError):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status, headers=headers
    )


def field_path(loc) -> str:
    """A pydantic error location as a field path: ("body", "messages", 0, "role") -> messages[0].role;
    union-branch tags (str, list[...], TextPart, ScorePair) are left out."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[a-z_][a-z0-9_]*", part) and part not in ("str", "int", "float", "bool"):
            out += f".{part}" if out else part
    return out


def _where(error: dict) -> str:
    """The error's field; core's checks (api.invalid) name the field inside the model they check."""
    where = field_path(error["loc"])
    inner = (error.get("ctx") or {}).get("field") if error["type"] == api.CORE_CHECK else None
    if inner:
        where = f"{where}.{inner}" if where else inner
    return where


def install(app: FastAPI) -> None:
    """The exception handlers that turn every failure into error_response."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(ScoreError)
    async def score_error(request: Request, exc: ScoreError):
        return error_response(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        where = _where(errors[0]) if errors else ""
        reasons = list(dict.fromkeys(e["msg"] for e in errors if _where(e) == where))[:3]
        return error_response(422, f"{where or 'body'}: {'; or '.join(reasons)}", where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return error_response(
            500,
            f"the server failed on this request ({type(exc).__name__}); its log has the details",
            headers={"Connection": "close"},
        )

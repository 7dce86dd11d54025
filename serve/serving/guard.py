"""`Guard`, the ASGI middleware in front of every route: the Host header must name a served host
(DNS rebinding); the API key is checked before any body is read; the body is read with a size
limit (chunked too) and a time limit, must be UTF-8 JSON no deeper than MAX_DEPTH with no lone
surrogates, and is then replayed to the app. Its refusals close the connection."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time

from starlette.datastructures import Headers

from serve.serving.errors import RequestError, error_response
from serve.serving.limits import MAX_DEPTH

OPEN_ROUTES = {"/health"}


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
            raise RequestError(
                400, f"{where}: a string with a lone surrogate (\\ud800-\\udfff); send UTF-8 text", where
            )
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
            return await error_response(err.status, err.message, err.param, headers)(scope, receive, send)
        await self.app(scope, receive, send)

    async def _check(self, scope, receive):
        headers = Headers(scope=scope)
        host = host_name(headers.get("host", ""))
        if "*" not in self.hosts and host not in self.hosts:
            raise RequestError(
                400,
                f"Host {host!r} is not served; start `orpo serve` with --allowed-host {host or 'NAME'} to serve it",
                "host",
            )
        if scope["method"] == "OPTIONS":
            return receive  # CORS preflight: answered by CORS (or 405) without a body
        if (
            scope["path"] not in OPEN_ROUTES
            and self.api_key is not None
            and not hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {self.api_key}".encode())
        ):
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
        check_json(raw)  # refused here with a clear 400, before any route parses it
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

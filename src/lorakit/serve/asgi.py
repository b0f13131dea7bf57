"""HTTP for ``LoraServer``: Starlette routes, served by uvicorn (the stack vLLM's OpenAI server uses).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
``stream: true`` as server-sent events), POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter
(vLLM's names), GET /health, GET /metrics (Prometheus text); with ``server.tinker`` set, the Tinker
API under ``/api/v1/`` (``serve.tinker``). ``/v1`` routes need the API key when
one is set. A client that disconnects cancels its request: its batch slot is free at the next
engine step, and a stream dropped before its first token leaves the queue without being prefilled.
A full waiting queue answers 429 with ``Retry-After``. Once the engine's worker thread has died,
``/health`` and new requests answer 503.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from typing import Any, AsyncIterator, Optional

from ..extras import require

uvicorn = require("uvicorn", "serve", "lorakit serve")
require("starlette", "serve", "lorakit serve")
from starlette.applications import Starlette  # noqa: E402  (after the check above)
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.requests import Request as HttpRequest  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from ..generation import Completion, Delta  # noqa: E402
from .app import ApiError, LoraServer, completion_logprobs, usage_of

_POST_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def _error(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def make_app(server: LoraServer) -> Starlette:
    """The ASGI application of ``server``."""

    def authorised(request: HttpRequest) -> bool:
        key = server.config.api_key
        if key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    async def body_of(request: HttpRequest) -> dict:
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a Content-Length header is required")
        if int(length) > server.config.max_body_bytes:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {server.config.max_body_bytes}")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"invalid JSON body: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object")
        return body

    async def endpoint(request: HttpRequest) -> Response:
        path = request.url.path.rstrip("/") or "/"
        if path.startswith("/api/v1/") and server.tinker is not None:
            return await server.tinker.handle(request)
        try:
            if path.startswith("/v1/") and not authorised(request):
                raise ApiError(401, "invalid or missing API key", code="invalid_api_key")
            if request.method == "GET":
                if path == "/v1/models":
                    return JSONResponse(server.models())
                if path == "/health":
                    status, health = server.health()
                    return JSONResponse(health, status_code=status)
                if path == "/metrics":
                    return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
                raise ApiError(404, f"no route GET {request.url.path}", code="not_found")
            if path not in _POST_ROUTES:
                raise ApiError(404, f"no route POST {request.url.path}", code="not_found")
            body = await body_of(request)
            if path == "/v1/load_lora_adapter":
                return JSONResponse(await asyncio.to_thread(server.load, body))
            if path == "/v1/unload_lora_adapter":
                return JSONResponse(await asyncio.to_thread(server.unload, body))
            return await complete(request, body, chat=path == "/v1/chat/completions")
        except ApiError as err:
            return _error(err)
        except Exception as err:  # a bug must not take the server down
            return _error(ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error"))

    async def complete(http: HttpRequest, body: dict, chat: bool) -> Response:
        request, meta = server.build_request(body, chat)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        events = server.events(request)
        if not body.get("stream"):
            arrived, done = await _unless_disconnected(http, _completion_of(events))
            if not arrived or done is None:  # the client went away; nobody reads this
                return Response(status_code=499)
            choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
            if meta["logprobs"]:
                choice["logprobs"] = completion_logprobs(server, done, chat, meta["token_ids"])
            if chat:
                choice["message"] = {"role": "assistant", "content": done.text}
            else:
                choice["text"] = done.text
            return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": meta["model"], "choices": [choice], "usage": usage_of(done)})
        # Errors before the first token still get a proper status code; a client that leaves before
        # it (its request queued, or its prompt prefilling) cancels the request there and then.
        arrived, first = await _unless_disconnected(http, events.__anext__())
        if not arrived:
            await events.aclose()
            return Response(status_code=499)
        chunks = _sse(events, first, ident, created, meta["model"], chat,
                      bool((body.get("stream_options") or {}).get("include_usage")))
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def http_error(request: HttpRequest, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        return _error(ApiError(status, f"{getattr(exc, 'detail', exc)}: {request.method} {request.url.path}",
                               code="method_not_allowed" if status == 405 else None))

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])],
                     exception_handlers={HTTPException: http_error})


async def _completion_of(events: AsyncIterator[Any]) -> Optional[Completion]:
    async for item in events:
        if isinstance(item, Completion):
            return item
    return None


async def _unless_disconnected(http: HttpRequest, awaitable: Any) -> tuple[bool, Any]:
    """``(True, result of awaitable)``, or ``(False, None)`` if the client disconnects first: then the
    awaitable is cancelled (an events iterator's cleanup cancels its request)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return True, task.result()
            if await http.is_disconnected():
                return False, None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its cleanup (the request's cancellation) has run when this returns


async def _sse(events: Any, first: Any, ident: str, created: int, model: str, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of one streamed completion; closing it early cancels the request."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict, usage: Optional[dict] = None) -> str:
        chunk = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
        if usage is not None:
            chunk = {**chunk, "choices": [], "usage": usage}
        return f"data: {json.dumps(chunk)}\n\n"

    try:
        if chat:
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None})
        item = first
        while True:
            if isinstance(item, Delta) and (item.text or item.finish_reason):
                content = {"delta": {"content": item.text} if item.text else {}} if chat else {"text": item.text}
                yield event({"index": 0, **content, "finish_reason": item.finish_reason, "logprobs": None})
            elif isinstance(item, Completion):
                if include_usage:
                    yield event({}, usage=usage_of(item))
                break
            try:
                item = await events.__anext__()
            except ApiError as err:  # mid-stream failure: report it in-band, then end the stream
                yield f"data: {json.dumps(err.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


class HttpServer:
    """uvicorn serving ``server`` on a socket bound at construction (``port`` 0 picks a free one).

    ``serve_forever`` blocks (Ctrl-C or ``shutdown`` stop it); ``server_address`` is (host, port).
    """

    def __init__(self, server: LoraServer, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.lora_server = server
        self.socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(make_app(server), log_level="warning", access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=2)
        self._uvicorn = uvicorn.Server(config)

    def serve_forever(self) -> None:
        self._uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True

    def server_close(self) -> None:
        self.socket.close()


def make_http_server(server: LoraServer, host: str = "127.0.0.1", port: int = 8000) -> HttpServer:
    return HttpServer(server, host, port)


def serve_in_thread(server: LoraServer, host: str = "127.0.0.1", port: int = 0) -> tuple[HttpServer, str]:
    """Start the HTTP server on a background thread; returns it and its base URL (for embedding, tests)."""
    httpd = make_http_server(server, host, port)
    threading.Thread(target=httpd.serve_forever, name="lorakit-http", daemon=True).start()
    return httpd, f"http://{host}:{httpd.server_address[1]}"

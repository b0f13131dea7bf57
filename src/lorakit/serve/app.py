"""An OpenAI-compatible HTTP server: one base model, many LoRA adapters, chosen per request.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
``stream: true`` as server-sent events), POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter
(vLLM's names), GET /health. Errors use OpenAI's shape: ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from ..generation import Completion, Delta, Engine, Request, SamplingParams
from ..generation.simple import format_prompt
from ..lora import delete_adapter, load_adapter
from ..lora.layer import check_adapter_name
from .scheduler import Scheduler


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServerConfig:
    """Limits and access control of the server."""

    base_name: str
    """The model name that selects the base model (no adapter)."""
    api_key: Optional[str] = None
    """If set, every request needs ``Authorization: Bearer <api_key>``."""
    adapter_dir: Optional[Path] = None
    """If set, /v1/load_lora_adapter only loads adapters inside this directory."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies get 413."""
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for."""
    default_max_tokens: int = 256
    """max_tokens when a request gives none."""
    context_length: int = 2048
    """Prompt tokens + max_tokens may not exceed this."""


class LoraServer:
    """The server's state: model, tokenizer, engine, scheduler, limits."""

    def __init__(self, model: Any, tokenizer: Any, config: ServerConfig, max_batch: int = 16) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.engine = Engine(model, tokenizer)
        self.scheduler = Scheduler(self.engine, max_batch=max_batch)
        self.created = int(time.time())

    # --- model registry ---------------------------------------------------------------------------
    def models(self) -> dict:
        data = [{"id": self.config.base_name, "object": "model", "created": self.created, "owned_by": "lorakit",
                 "root": self.config.base_name, "parent": None}]
        for name in self.engine.adapters():
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "lorakit",
                         "root": name, "parent": self.config.base_name})
        return {"object": "list", "data": data}

    def adapter_for(self, model_name: Any) -> Optional[str]:
        if not isinstance(model_name, str) or not model_name:
            raise ApiError(400, "'model' is required: the base model's name or an adapter's", param="model")
        if model_name == self.config.base_name:
            return None
        if model_name in self.engine.adapters():
            return model_name
        raise ApiError(404, f"The model `{model_name}` does not exist.", code="model_not_found", param="model")

    def load(self, body: dict) -> dict:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise ApiError(400, "'lora_name' and 'lora_path' (strings) are required")
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise ApiError(400, str(err), param="lora_name") from None
        if name == self.config.base_name or name in self.engine.adapters():
            raise ApiError(400, f"an adapter named '{name}' is already loaded", param="lora_name")
        resolved = self._resolve(path)

        def do_load() -> None:
            # load_adapter checks every key and shape against the base before changing anything,
            # and the scheduler lock keeps it between batches: it becomes visible whole or not at all.
            load_adapter(self.model, resolved, adapter_name=name, activate=False)

        try:
            self.scheduler.exclusive(do_load)
        except (ValueError, FileNotFoundError) as err:
            raise ApiError(400, f"cannot load adapter '{name}': {err}", param="lora_path") from None
        return {"status": "ok", "lora_name": name}

    def unload(self, body: dict) -> dict:
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in self.engine.adapters():
            raise ApiError(404, f"no adapter named {name!r} is loaded", code="model_not_found", param="lora_name")
        self.scheduler.exclusive(lambda: delete_adapter(self.model, name))
        return {"status": "ok", "lora_name": name}

    def _resolve(self, path: str) -> Path:
        root = self.config.adapter_dir
        candidate = Path(path)
        if root is None:
            return candidate
        root = root.resolve()
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if resolved != root and root not in resolved.parents:
            raise ApiError(403, f"lora_path '{path}' is outside the server's --adapter-dir", param="lora_path",
                           code="forbidden_path")
        return resolved

    # --- requests -------------------------------------------------------------------------------------
    def build_request(self, body: dict, chat: bool) -> tuple[Request, dict]:
        adapter = self.adapter_for(body.get("model"))
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
            text, _ = format_prompt(self.tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages],
                                    chat=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                ids = list(prompt)
            elif isinstance(prompt, str) and prompt:
                ids = self.tokenizer(prompt)["input_ids"]
            else:
                raise ApiError(400, "'prompt' must be a non-empty string (or a list of token ids)", param="prompt")
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        max_tokens = self.config.default_max_tokens if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "'max_tokens' must be a positive integer", param="max_tokens")
        if max_tokens > self.config.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} exceeds this server's limit of {self.config.max_tokens_limit}",
                           param="max_tokens")
        if len(ids) + max_tokens > self.config.context_length:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} that exceeds the "
                           f"model's context of {self.config.context_length} tokens", param="prompt",
                           code="context_length_exceeded")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, exclusive_low=True),
            top_k=max(0, int(_number(body, "top_k", 0, -1, 1e9))),  # -1 (vLLM) and 0 both mean "all"
            stop=stop,
            seed=body.get("seed") if isinstance(body.get("seed"), int) else None,
            ignore_eos=bool(body.get("ignore_eos", False)),
        )
        meta = {"model": body["model"], "logprobs": body.get("logprobs") is not None and body.get("logprobs") is not False,
                "token_ids": bool(body.get("return_tokens_as_token_ids", False))}
        return Request(ids, adapter, params), meta

    def run(self, request: Request):
        """Submit ``request``; yield its Deltas as they come, then its Completion."""
        pending = self.scheduler.submit(request)
        while True:
            item = pending.out.get()
            if isinstance(item, LookupError):
                raise ApiError(404, str(item), code="model_not_found", param="model")
            if isinstance(item, Exception):
                raise ApiError(500, f"generation failed: {item}", kind="server_error")
            yield item
            if isinstance(item, Completion):
                return


def _number(body: dict, key: str, default: float, low: float, high: float, exclusive_low: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value > high or value < low or (
            exclusive_low and value <= low):
        raise ApiError(400, f"'{key}' must be a number in {'(' if exclusive_low else '['}{low:g}, {high:g}]", param=key)
    return float(value)


def _usage(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.token_ids),
            "total_tokens": done.prompt_tokens + len(done.token_ids)}


def _completion_logprobs(server: LoraServer, done: Completion, chat: bool, token_ids: bool = False) -> dict:
    """OpenAI's logprobs object. ``token_ids`` (vLLM's return_tokens_as_token_ids) names each token
    ``token_id:N`` and, as vLLM does, includes the end-of-sequence token the model stopped on."""
    if token_ids:
        ids = done.token_ids + ([done.stop_token_id] if done.stop_token_id is not None else [])
        logprobs = done.logprobs + ([done.stop_logprob] if done.stop_token_id is not None else [])
        tokens = [f"token_id:{t}" for t in ids]
        if chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                                for t, lp in zip(tokens, logprobs)]}
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": None}
    tokens = [server.tokenizer.decode([t]) for t in done.token_ids]
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, lp in zip(tokens, done.logprobs)]}
    return {"tokens": tokens, "token_logprobs": done.logprobs, "top_logprobs": None, "text_offset": None}


def make_handler(server: LoraServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "lorakit"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # quiet by default; errors are answered to the client

        # --- plumbing --------------------------------------------------------------------------------
        def _send_json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            key = server.config.api_key
            if key is None:
                return True
            given = self.headers.get("Authorization", "")
            return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

        def _body(self) -> dict:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise ApiError(411, "a Content-Length header is required")
            if int(length) > server.config.max_body_bytes:
                self.close_connection = True  # the unread body must not be parsed as a next request
                raise ApiError(413, f"request body of {length} bytes exceeds the limit of {server.config.max_body_bytes}")
            raw = self.rfile.read(int(length))
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ApiError(400, f"invalid JSON body: {err}") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the JSON body must be an object")
            return body

        def _guard(self, fn) -> None:
            try:
                if not self._authorised():
                    raise ApiError(401, "invalid or missing API key", code="invalid_api_key")
                fn()
            except ApiError as err:
                self._send_json(err.status, err.body())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away
            except Exception as err:  # a bug must not take the server down
                self._send_json(500, ApiError(500, f"internal error: {type(err).__name__}: {err}",
                                              kind="server_error").body())

        # --- routes ----------------------------------------------------------------------------------
        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            def route() -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send_json(200, server.models())
                elif self.path.rstrip("/") == "/health":
                    batches = server.scheduler.batches
                    self._send_json(200, {"status": "ok", "batches_run": len(batches),
                                          "largest_batch": max(batches, default=0)})
                else:
                    raise ApiError(404, f"no route GET {self.path}", code="not_found")

            self._guard(route)

        def do_POST(self) -> None:  # noqa: N802
            def route() -> None:
                path = self.path.rstrip("/")
                if path not in ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                                "/v1/unload_lora_adapter"):
                    raise ApiError(404, f"no route POST {self.path}", code="not_found")
                body = self._body()
                if path == "/v1/load_lora_adapter":
                    self._send_json(200, server.load(body))
                elif path == "/v1/unload_lora_adapter":
                    self._send_json(200, server.unload(body))
                else:
                    self._complete(body, chat=path == "/v1/chat/completions")

            self._guard(route)

        def _complete(self, body: dict, chat: bool) -> None:
            request, meta = server.build_request(body, chat)
            ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            kind = "chat.completion" if chat else "text_completion"
            if not body.get("stream"):
                done = [item for item in server.run(request) if isinstance(item, Completion)][0]
                choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
                if meta["logprobs"]:
                    choice["logprobs"] = _completion_logprobs(server, done, chat, meta["token_ids"])
                if chat:
                    choice["message"] = {"role": "assistant", "content": done.text}
                else:
                    choice["text"] = done.text
                self._send_json(200, {"id": ident, "object": kind, "created": created, "model": meta["model"],
                                      "choices": [choice], "usage": _usage(done)})
                return
            self._stream(request, meta, ident, created, chat, body)

        def _stream(self, request: Request, meta: dict, ident: str, created: int, chat: bool, body: dict) -> None:
            events = server.run(request)
            first = next(events)  # errors before the first token still get a proper status code
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            kind = "chat.completion.chunk" if chat else "text_completion"

            def send(choice: dict, usage: Optional[dict] = None) -> None:
                chunk = {"id": ident, "object": kind, "created": created, "model": meta["model"], "choices": [choice]}
                if usage is not None:
                    chunk = {**chunk, "choices": [], "usage": usage}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            if chat:
                send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None})
            item = first
            while True:
                if isinstance(item, Delta):
                    if item.text or item.finish_reason:
                        content = {"delta": {"content": item.text} if item.text else {}} if chat else {"text": item.text}
                        send({"index": 0, **content, "finish_reason": item.finish_reason, "logprobs": None})
                elif isinstance(item, Completion):
                    if (body.get("stream_options") or {}).get("include_usage"):
                        send({}, usage=_usage(item))
                    break
                try:
                    item = next(events)
                except ApiError as err:  # mid-stream failure: report it in-band, then end the stream
                    self.wfile.write(f"data: {json.dumps(err.body())}\n\n".encode())
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def make_http_server(server: LoraServer, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer((host, port), make_handler(server))
    httpd.daemon_threads = True
    return httpd


def serve_in_thread(server: LoraServer, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start the HTTP server on a background thread; returns it and its base URL (for embedding, tests)."""
    httpd = make_http_server(server, host, port)
    threading.Thread(target=httpd.serve_forever, name="lorakit-http", daemon=True).start()
    return httpd, f"http://{host}:{httpd.server_address[1]}"

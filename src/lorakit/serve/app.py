"""The server's state behind the OpenAI-compatible API: one base model, many LoRA adapters.

``LoraServer`` turns request bodies into engine requests, routes them by model name to an adapter
(or the base), loads and unloads adapters, and hands each request's output back as it comes. The
HTTP layer (``asgi.py``) sits on top. Errors are ``ApiError``: OpenAI's shape ``{"error":
{"message", "type", "param", "code"}}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from ..generation import Completion, Delta, Engine, Request, SamplingParams
from ..generation.simple import format_prompt
from ..lora import adapter_fingerprint, delete_adapter, load_read_adapter, read_adapter
from ..lora.layer import check_adapter_name
from .metrics import ServerMetrics
from .scheduler import AdapterUnloaded, LoopSink, QueueFull, Rejected, Scheduler, WorkerDead

# What vLLM and OpenAI accept as a seed: a signed 64-bit integer.
_SEED_RANGE = (-(2**63), 2**63 - 1)


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
    """Prompt tokens + max_tokens may not exceed this (a request over it gets 400 naming ``prompt``).
    At most ``max_num_batched_tokens``, so a request that fits the context always fits the batch."""
    max_num_seqs: int = 64
    """Requests decoded together in one batch at most; more wait in the queue."""
    max_queue: int = 256
    """Requests that may wait for a batch slot; more are refused with 429 and Retry-After."""
    prefill_chunk: int = 2048
    """Prompt tokens prefilled per engine step at most (longer prompts take several steps, so they do
    not stall the requests that are decoding; a burst of short prompts is prefilled in one forward)."""
    max_num_batched_tokens: Optional[int] = None
    """KV-cache tokens the running batch may hold, counted as rows x the longest request's prompt +
    max_tokens (the engine's ``max_num_batched_tokens``): more requests wait in the queue rather
    than grow the cache past it. None: only ``max_num_seqs`` bounds the batch."""


class LoraServer:
    """The server's state: model, tokenizer, engine, scheduler, limits, metrics."""

    def __init__(self, model: Any, tokenizer: Any, config: ServerConfig, max_batch: Optional[int] = None) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        budget = config.max_num_batched_tokens
        if budget is not None and config.context_length > budget:
            raise ValueError(f"context_length ({config.context_length}) exceeds max_num_batched_tokens ({budget}): "
                             "a request as long as the context could never be scheduled")
        self.engine = Engine(model, tokenizer, max_num_seqs=max_batch or config.max_num_seqs,
                             prefill_chunk=config.prefill_chunk, max_num_batched_tokens=budget)
        self.scheduler = Scheduler(self.engine, max_queue=config.max_queue)
        self.metrics = ServerMetrics(lambda: self.scheduler.running, lambda: self.scheduler.waiting)
        self.created = int(time.time())
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        # Rows of the embedding table: an id past it fails the whole batch's forward, so it is refused here.
        self.vocab_size = int(getattr(embeddings, "num_embeddings", None) or model.config.vocab_size)
        self.tinker: Any = None
        """The Tinker API (``serve.tinker.TinkerService``) when it is served beside the OpenAI one."""
        self.fingerprints: dict[str, str] = {}
        """Adapter name -> ``adapter_fingerprint`` of the weights this server read for it (a trainer
        compares it with its own, so a sync that did not land is caught)."""

    def health(self) -> tuple[int, dict]:
        """``/health``: 200 while the worker thread serves, 503 (with the reason) once it has stopped."""
        scheduler = self.scheduler
        body = {"status": "ok" if scheduler.alive else "error", "running": scheduler.running,
                "waiting": scheduler.waiting, "steps_run": self.engine.steps, "largest_batch": self.engine.largest_batch}
        if self.tinker is not None:
            trainer = self.tinker.trainer
            body["tinker"] = {"models": len(trainer.models), "train_steps": trainer.steps,
                              "largest_train_step": trainer.largest_step}
        if not scheduler.alive:
            cause = scheduler.error
            body["error"] = (f"the engine's worker thread has stopped: {type(cause).__name__}: {cause}"
                             if cause is not None else "the engine's worker thread has stopped")
            return 503, body
        return 200, body

    # --- model registry ---------------------------------------------------------------------------
    def models(self) -> dict:
        data = [{"id": self.config.base_name, "object": "model", "created": self.created, "owned_by": "lorakit",
                 "root": self.config.base_name, "parent": None}]
        for name in self.engine.adapters():
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "lorakit",
                         "root": name, "parent": self.config.base_name, "fingerprint": self.fingerprints.get(name)})
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
            # and it runs between engine steps: it becomes visible whole or not at all.
            read = read_adapter(resolved)
            load_read_adapter(self.model, read, adapter_name=name, activate=False)
            # Hashed from the tensors just loaded (as the file held them, before any cast to the
            # server's dtype), so it says what this server serves, not what a client meant to send.
            self.fingerprints[name] = adapter_fingerprint(read[1])

        try:
            _exclusive(self.scheduler, do_load)
        except (ValueError, FileNotFoundError) as err:
            raise ApiError(400, f"cannot load adapter '{name}': {err}", param="lora_path") from None
        return {"status": "ok", "lora_name": name, "fingerprint": self.fingerprints[name]}

    def unload(self, body: dict) -> dict:
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in self.engine.adapters():
            raise ApiError(404, f"no adapter named {name!r} is loaded", code="model_not_found", param="lora_name")
        def do_unload() -> None:
            self.scheduler.fail_requests_using(name)  # they end with 404, the others go on
            delete_adapter(self.model, name)
            self.fingerprints.pop(name, None)

        _exclusive(self.scheduler, do_unload)
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
        bad = next((t for t in ids if isinstance(t, bool) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"'prompt' holds token id {bad!r}, outside the model's vocabulary of "
                           f"{self.vocab_size} ids (0 to {self.vocab_size - 1})", param="prompt")
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
            seed=_seed(body),
            ignore_eos=bool(body.get("ignore_eos", False)),
        )
        meta = {"model": body["model"], "logprobs": body.get("logprobs") is not None and body.get("logprobs") is not False,
                "token_ids": bool(body.get("return_tokens_as_token_ids", False))}
        return Request(ids, adapter, params), meta

    async def events(self, request: Request) -> AsyncIterator[Any]:
        """Submit ``request``; yield its Deltas as they come, then its Completion. Closing the iterator
        early (the client went away) cancels the request and frees its batch slot."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        try:
            ticket = self.scheduler.submit(request, LoopSink(loop, items))
        except WorkerDead as err:
            raise ApiError(503, str(err), kind="server_error") from None
        except QueueFull as err:
            self.metrics.rejected.inc()
            raise ApiError(429, f"the server is busy: {err}; retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        start, first = time.monotonic(), True
        try:
            while True:
                item = await items.get()
                if isinstance(item, AdapterUnloaded):
                    raise ApiError(404, str(item), code="model_not_found", param="model")
                if isinstance(item, Rejected):
                    raise ApiError(400, str(item), param=item.param)
                if isinstance(item, Exception):
                    raise ApiError(500, f"generation failed: {item}", kind="server_error")
                if first and isinstance(item, (Delta, Completion)):
                    self.metrics.ttft.observe(time.monotonic() - start)
                    first = False
                if isinstance(item, Completion):
                    self.metrics.latency.observe(time.monotonic() - start)
                    self.metrics.prompt_tokens.inc(item.prompt_tokens)
                    self.metrics.finished.labels(item.finish_reason).inc()
                if isinstance(item, Delta) and item.token_id is not None:
                    self.metrics.generation_tokens.inc()
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            if not ticket.done:
                self.scheduler.cancel(ticket)
                self.metrics.cancelled.inc()


def _exclusive(scheduler: Scheduler, fn: Any) -> Any:
    try:
        return scheduler.exclusive(fn)
    except WorkerDead as err:
        raise ApiError(503, str(err), kind="server_error") from None


def _seed(body: dict) -> Optional[int]:
    seed = body.get("seed")
    if seed is None:
        return None
    low, high = _SEED_RANGE
    if not isinstance(seed, int) or isinstance(seed, bool) or not low <= seed <= high:
        raise ApiError(400, f"'seed' must be an integer in [-2**63, 2**63 - 1] (a signed 64-bit integer), "
                       f"got {seed!r}", param="seed")
    return seed


def _number(body: dict, key: str, default: float, low: float, high: float, exclusive_low: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value > high or value < low or (
            exclusive_low and value <= low):
        raise ApiError(400, f"'{key}' must be a number in {'(' if exclusive_low else '['}{low:g}, {high:g}]", param=key)
    return float(value)


def usage_of(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.token_ids),
            "total_tokens": done.prompt_tokens + len(done.token_ids)}


def completion_logprobs(server: LoraServer, done: Completion, chat: bool, token_ids: bool = False) -> dict:
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

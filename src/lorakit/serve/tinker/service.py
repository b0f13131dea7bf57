"""The Tinker API's HTTP side: sessions, the ``/api/v1/`` routes, and the wire shapes of answers.

Every route answers what the SDK (0.38) expects: a long operation gives ``{"request_id"}`` at once
and its result through ``retrieve_future`` (protobuf for forward/backward and samples, JSON for the
rest); a failed operation is ``{"error", "category"}`` with HTTP 200, which the SDK raises as
``RequestFailedError``. Requests that cannot even be queued (an unknown model, a malformed body)
fail the same way, so a client always reads one clear reason. With ``--api-key`` set every request
needs ``X-API-Key: <key>`` (the SDK's header; keys start with ``tml-``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from .codec import PROTO, WireError, decode_forward_backward
from .futures import SERVER, USER, FutureRecord, Futures, TinkerError
from .sampling import Samplers
from .training import Trainer


@dataclass
class TinkerConfig:
    """The Tinker API's settings (``lorakit serve --tinker``)."""

    tinker_dir: Path
    """Where ``tinker://`` checkpoints live (PEFT-format directories); paths outside it are refused."""
    max_lora_rank: int = 64
    """The largest LoRA rank a training client may ask for."""
    max_body_bytes: int = 256 << 20
    """Larger request bodies are refused (forward_backward batches are big)."""
    poll_timeout: float = 25.0
    """Seconds a ``retrieve_future`` poll waits for a result before answering ``try_again`` (the SDK
    gives up on a poll after 45 s)."""
    session_timeout: float = 600.0
    """A session with no heartbeat for this long is closed (its models and samplers are freed)."""
    max_snapshots: int = 2
    """Ephemeral sampler snapshots kept per training model (``save_weights_and_get_sampling_client``);
    older ones are freed (their adapter once no request in flight uses it)."""
    max_datum_tokens: Optional[int] = None
    """The longest datum a forward/backward accepts; None: the server's context length."""


@dataclass(eq=False)
class Session:
    session_id: str
    last_seen: float
    models: int = 0
    samplers: int = 0


def _json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _failed(err: TinkerError) -> JSONResponse:
    return _json({"error": err.message, "category": err.category})


class TinkerService:
    """The Tinker API on a ``LoraServer``'s model, engine and scheduler.

    Args:
        server: the ``LoraServer`` whose base and engine the API shares with the OpenAI routes.
        config: the Tinker settings.
    """

    def __init__(self, server: Any, config: TinkerConfig) -> None:
        self.server, self.config = server, config
        config.tinker_dir.mkdir(parents=True, exist_ok=True)
        self.futures = Futures()
        self.sessions: dict[str, Session] = {}
        self._tasks: set[asyncio.Task] = set()  # background operations (the loop only holds them weakly)
        self.samplers = Samplers(server, self.futures, config.tinker_dir, config.max_snapshots)
        self.trainer = Trainer(server, self.futures, config.tinker_dir, config.max_lora_rank,
                               config.max_datum_tokens or server.config.context_length,
                               on_snapshot=self.samplers.snapshot)

    # --- HTTP ---------------------------------------------------------------------------------------
    def authorised(self, request: HttpRequest) -> bool:
        key = self.server.config.api_key
        if key is None:
            return True
        given = request.headers.get("x-api-key", "")
        bearer = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), key.encode()) or hmac.compare_digest(bearer.encode(),
                                                                                        f"Bearer {key}".encode())

    async def handle(self, request: HttpRequest) -> Response:
        """Answer one ``/api/v1/...`` request."""
        path = request.url.path.rstrip("/")[len("/api/v1/"):]
        if not self.authorised(request):
            return _json({"error": "invalid or missing API key: send X-API-Key: <the server's --api-key>",
                          "category": USER}, 401)
        try:
            if request.method == "GET":
                return await self._get(path)
            raw = await self._raw(request)
            if path == "forward_backward":
                return await self._forward_backward(raw, request.headers.get("content-type", ""))
            body = self._body(raw)
            handler = getattr(self, "_post_" + path.replace("/", "_"), None)
            if handler is None and path.startswith("sessions/") and path.endswith("/finish"):
                return await self._finish(path.split("/")[1])
            if handler is None:
                return _json({"error": f"no route POST /api/v1/{path} on this server", "category": USER}, 404)
            return await handler(body)
        except TinkerError as err:
            return _json({"error": err.message, "category": err.category}, 400)
        except Exception as err:  # a bug must not take the server down
            return _json({"error": f"internal error: {type(err).__name__}: {err}", "category": SERVER}, 500)

    async def _raw(self, request: HttpRequest) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
            raise TinkerError(f"request body of {length} bytes exceeds the limit of {self.config.max_body_bytes}")
        raw = await request.body()
        if request.headers.get("content-encoding", "").lower() == "zstd":
            import zstandard

            try:
                raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=self.config.max_body_bytes)
            except zstandard.ZstdError as err:
                raise TinkerError(f"the zstd body does not decompress: {err}") from None
        if len(raw) > self.config.max_body_bytes:
            raise TinkerError(f"request body of {len(raw)} bytes exceeds the limit of {self.config.max_body_bytes}")
        return raw

    @staticmethod
    def _body(raw: bytes) -> dict:
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TinkerError(f"invalid JSON body: {err}") from None
        if not isinstance(body, dict):
            raise TinkerError("the JSON body must be an object")
        return body

    async def _get(self, path: str) -> Response:
        if path == "healthz":
            return _json({"status": "ok"})
        if path == "get_server_capabilities":
            return _json({"supported_models": [{"model_name": self.server.config.base_name, "trainable": True,
                                                "sampleable": True,
                                                "max_context_length": self.server.config.context_length}]})
        if path.startswith("samplers/"):
            sampler = self.samplers.get(path.split("/", 1)[1])
            return _json({"sampler_id": sampler.sampler_id, "base_model": self.server.config.base_name,
                          "model_path": sampler.model_path})
        if path.startswith("training_runs/") and path.count("/") == 1:
            return _json(self._training_run(path.split("/", 1)[1]))
        return _json({"error": f"no route GET /api/v1/{path} on this server", "category": USER}, 404)

    def _training_run(self, model_id: str) -> dict:
        state = self.trainer.get(model_id)

        def checkpoint(kind: str) -> Optional[dict]:
            found = [c for c in state.checkpoints if c["checkpoint_type"] == kind]
            if not found:
                return None
            c = found[-1]
            return {**c, "time": _iso(c["time"])}
        return {"training_run_id": model_id, "base_model": self.server.config.base_name, "model_owner": state.session_id,
                "is_lora": True, "corrupted": False, "lora_rank": state.lora["rank"],
                "last_request_time": _iso(state.last_request), "last_checkpoint": checkpoint("training"),
                "last_sampler_checkpoint": checkpoint("sampler"), "user_metadata": state.user_metadata}

    # --- sessions ---------------------------------------------------------------------------------
    async def _post_client_config(self, body: dict) -> Response:
        # Plain API keys, one retrieve_future poll per request, fwd/bwd bodies uncompressed.
        return _json({"pjwt_auth_enabled": False, "sample_use_retrieve_futures": False,
                      "custom_loss_server_side": False, "sample_join_sampling_session": True,
                      "proto_compress_fwdbwd": False, "use_pyqwest_transport": False})

    async def _post_client_dynamic_config(self, body: dict) -> Response:
        return _json({})

    async def _post_telemetry(self, body: dict) -> Response:
        return _json({"status": "accepted"})

    async def _post_create_session(self, body: dict) -> Response:
        await self._expire()
        session = Session(f"session-{uuid.uuid4().hex[:16]}", time.monotonic())
        self.sessions[session.session_id] = session
        return _json({"type": "create_session", "session_id": session.session_id})

    async def _post_session_heartbeat(self, body: dict) -> Response:
        await self._expire()
        session = self.sessions.get(body.get("session_id"))
        if session is None:
            return _json({"error": f"unknown or finished session {body.get('session_id')!r}", "category": USER}, 410)
        session.last_seen = time.monotonic()
        return _json({"type": "session_heartbeat"})

    def _session(self, session_id: Any) -> Session:
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise TinkerError(f"unknown or finished session {session_id!r}")
        session.last_seen = time.monotonic()
        return session

    async def _finish(self, session_id: str) -> Response:
        if self.sessions.pop(session_id, None) is not None:
            await asyncio.to_thread(self._close, session_id)
        return _json({})

    def _close(self, session_id: str) -> None:
        """Free a session's samplers, models and their adapters (saved checkpoints stay on disk)."""
        self.samplers.close_session(session_id)
        for state in self.trainer.close_session(session_id):
            self.trainer.drop_adapter(state.adapter)

    async def _expire(self) -> None:
        now = time.monotonic()
        stale = [sid for sid, s in self.sessions.items() if now - s.last_seen > self.config.session_timeout]
        for session_id in stale:
            self.sessions.pop(session_id, None)
            await asyncio.to_thread(self._close, session_id)

    # --- futures ------------------------------------------------------------------------------------
    def _future(self, record: FutureRecord, **extra: Any) -> Response:
        return _json({"request_id": record.request_id, **extra})

    async def _background(self, key: Any, fn: Any) -> Response:
        """Start ``fn`` (blocking; returns the result dict) on a thread; answer its future."""
        record, new = self.futures.create(key)
        if new:
            async def run() -> None:
                try:
                    self.futures.resolve(record, await asyncio.to_thread(fn))
                except TinkerError as err:
                    self.futures.fail(record, err)
                except Exception as err:
                    self.futures.fail(record, TinkerError(f"internal error: {type(err).__name__}: {err}", SERVER))
            task = asyncio.get_running_loop().create_task(run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return self._future(record)

    async def _post_retrieve_future(self, body: dict) -> Response:
        record = self.futures.get(body.get("request_id"))
        if record is None:
            return _json({"error": f"unknown request_id {body.get('request_id')!r}", "category": USER}, 404)
        if not await self.futures.wait(record, self.config.poll_timeout):
            return _json({"type": "try_again", "request_id": record.request_id, "queue_state": "active"})
        if record.error is not None:
            return _failed(record.error)
        if isinstance(record.value, bytes):
            return Response(record.value, media_type=PROTO)
        return _json(record.value)

    # --- training ---------------------------------------------------------------------------------
    def _queue(self, body_model: Any, seq: Any, kind: str, payload: dict, record: FutureRecord) -> None:
        try:
            self.trainer.submit(body_model, seq, kind, record, payload)
        except TinkerError as err:
            self.futures.fail(record, err)

    async def _post_create_model(self, body: dict) -> Response:
        session = self._session(body.get("session_id"))
        seq = body.get("model_seq_id")
        model_id = f"{session.session_id}:train:{seq}"
        lora = body.get("lora_config") or {}
        if not isinstance(lora, dict):
            raise TinkerError("lora_config must be an object")
        optimizer = (body.get("optimizer_config") or {}).get("type", "adamw")
        if optimizer != "adamw":
            raise TinkerError(f"optimizer {optimizer!r} is not supported by this server (adamw only)")
        return await self._background(
            ("create", model_id),
            lambda: self.trainer.create(model_id, session.session_id, body.get("base_model"), lora,
                                        body.get("user_metadata")))

    async def _post_get_info(self, body: dict) -> Response:
        try:
            return _json(self.trainer.info(body.get("model_id")))
        except TinkerError as err:
            return _json({"error": err.message, "category": err.category}, 404)

    async def _forward_backward(self, raw: bytes, content_type: str) -> Response:
        if PROTO not in content_type:
            raise TinkerError("forward_backward takes a protobuf ForwardBackwardRequest "
                              f"(Content-Type: {PROTO}); this server speaks the SDK >= 0.38 wire format")
        try:
            head, data = decode_forward_backward(raw)
        except WireError as err:
            raise TinkerError(str(err)) from None
        record, new = self.futures.create(("train", head["model_id"], head["seq_id"]))
        if new:
            payload = {"model_id": head["model_id"], "loss_fn": head["loss_fn"],
                       "loss_fn_config": head["loss_fn_config"], "data": data}
            self._queue(head["model_id"], head["seq_id"], "fwd" if head["forward_only"] else "fb", payload, record)
        return self._future(record, model_id=head["model_id"])

    async def _ordered(self, body: dict, kind: str) -> Response:
        model_id, seq = body.get("model_id"), body.get("seq_id")
        record, new = self.futures.create(("train", model_id, seq))
        if new:
            self._queue(model_id, seq, kind, body, record)
        return self._future(record, model_id=model_id)

    async def _post_optim_step(self, body: dict) -> Response:
        if "optimizer_params" in body:
            raise TinkerError("only AdamW steps (adam_params) are supported by this server")
        if not isinstance(body.get("adam_params"), dict):
            raise TinkerError("optim_step needs adam_params")
        return await self._ordered(body, "optim")

    async def _post_save_weights(self, body: dict) -> Response:
        return await self._ordered(body, "save_state")

    async def _post_save_weights_for_sampler(self, body: dict) -> Response:
        return await self._ordered(body, "save_sampler")

    async def _post_load_weights(self, body: dict) -> Response:
        if body.get("session_id") is not None:  # create-via-load: the new model's first request
            session = self._session(body.get("session_id"))
            model_id = f"{session.session_id}:train:{body.get('model_seq_id')}"
            return await self._background(
                ("create", model_id),
                lambda: self.trainer.create(model_id, session.session_id, body.get("base_model"), {},
                                            body.get("user_metadata"), load_from=body.get("path"),
                                            with_optimizer=bool(body.get("optimizer"))))
        return await self._ordered(body, "load")

    # --- sampling ---------------------------------------------------------------------------------
    async def _post_create_sampling_session(self, body: dict) -> Response:
        session = self._session(body.get("session_id"))
        sampler = await asyncio.to_thread(self.samplers.create, session.session_id, body.get("model_path"),
                                          body.get("base_model"))
        return _json({"type": "create_sampling_session", "sampling_session_id": sampler.sampler_id})

    async def _post_join_sampling_session(self, body: dict) -> Response:
        counter = self.samplers.join(body.get("sampling_session_id"))
        return _json({"type": "join_sampling_session", "client_counter": counter})

    async def _post_asample(self, body: dict) -> Response:
        sampler_id = body.get("sampling_session_id")
        record, new = self.futures.create(("sample", sampler_id, body.get("seq_id")))
        num = body.get("num_samples", 1)
        ids = [f"{record.request_id}-{i}" for i in range(num if isinstance(num, int) and 0 < num <= 4096 else 1)]
        if new:
            try:
                ids = self.samplers.start(record, self.samplers.get(sampler_id), body)
            except TinkerError as err:
                self.futures.fail(record, err)
        return self._future(record, sample_sequence_ids=ids)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))

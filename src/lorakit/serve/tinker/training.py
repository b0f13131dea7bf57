"""Training clients of the Tinker API: one LoRA adapter per model id on the served base, its own
AdamW, and its requests run strictly in ``seq_id`` order.

Requests are queued per model and run by one dispatcher thread. Each round takes every model's next
request; the ``forward_backward`` requests among them (several clients' steps that arrived
together) run as *one* mixed-adapter batch (``training.tokenwise.forward_backward``: each row
routed to its adapter, each adapter's gradient exactly what its request alone would give), and
so do the ``forward`` requests; the rest run one by one. Everything that touches the model runs
on the engine's worker thread between two sampling steps (``Scheduler.exclusive``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ...lora import LoraConfig, active_adapters, adapter_state_dict, delete_adapter, inject_lora, set_active_adapters
from ...lora import load_read_adapter, set_adapter_weights
from ...lora.tree import iter_modules
from ...lora.io import PEFT_PREFIX, read_adapter
from ...lora.layer import LoraLayer
from ...training.tokenwise import AdamStep, AdapterOptimizer, LossRequest, check_datum, check_loss
from ...training.tokenwise import forward_backward
from . import checkpoints
from .codec import encode_forward_backward
from .futures import SERVER, FutureRecord, Futures, TinkerError

LORA_ALPHA = 32.0
"""LoRA alpha of every Tinker adapter (Tinker's own choice, so learning rates carry over)."""

_ATTN = ("attn", "attention")
_MLP = ("mlp", "feed_forward", "ffn")


@dataclass(eq=False)
class Op:
    """One queued request of a training client."""

    kind: str  # fb, fwd, optim, save_state, save_sampler, load
    seq: int
    record: FutureRecord
    payload: dict


@dataclass(eq=False)
class TrainingModel:
    """A training client's state."""

    model_id: str
    session_id: str
    lora: dict
    """rank, seed, train_mlp, train_attn, train_unembed."""
    optimizer: Optional[AdapterOptimizer] = None
    next_seq: int = 1
    queue: dict[int, Op] = field(default_factory=dict)
    snapshots: list[str] = field(default_factory=list)
    """Sampler ids of this model's ephemeral weight snapshots, oldest first."""
    user_metadata: Optional[dict] = None
    last_request: float = field(default_factory=time.time)
    checkpoints: list[dict] = field(default_factory=list)

    @property
    def adapter(self) -> str:
        return self.model_id


def lora_targets(model: torch.nn.Module, train_mlp: bool, train_attn: bool, train_unembed: bool) -> list[str]:
    """The leaf names of the linear layers to wrap: attention projections, MLP projections, the head
    (layers already wrapped for other adapters count by their base layer)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: set[str] = set()
    for path, module in iter_modules(model):
        base = getattr(module, "base_layer", module) if isinstance(module, LoraLayer) else module
        if not isinstance(base, torch.nn.Linear):
            continue
        leaf = path.rsplit(".", 1)[-1]
        parts = path.lower().split(".")
        if module is head or base is head:
            if train_unembed:
                names.add(leaf)
        elif any(p.endswith(_ATTN) for p in parts):
            if train_attn:
                names.add(leaf)
        elif any(p in _MLP or p.endswith("mlp") or p == "experts" for p in parts):
            if train_mlp:
                names.add(leaf)
    return sorted(names)


class Trainer:
    """The training side of the Tinker service (see the module docstring).

    Args:
        server: the ``LoraServer`` (model, tokenizer, scheduler, base name, vocabulary).
        futures: where results go.
        root: the ``--tinker-dir``.
        max_rank: the largest LoRA rank a client may ask for.
        max_tokens: the longest datum accepted.
        on_snapshot: registers an ephemeral sampler for a snapshot adapter: (model, adapter) -> sampler id.
    """

    def __init__(self, server: Any, futures: Futures, root: Path, max_rank: int, max_tokens: int,
                 on_snapshot: Callable[[TrainingModel, str], str]) -> None:
        self.server, self.futures, self.root = server, futures, root
        self.max_rank, self.max_tokens = max_rank, max_tokens
        self.on_snapshot = on_snapshot
        self.models: dict[str, TrainingModel] = {}
        self._cond = threading.Condition()
        self._held = 0
        self._snapshots = 0
        pad = server.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.steps = 0
        """Batched forward/backward steps run."""
        self.largest_step = 0
        """Most requests run together in one forward/backward step."""
        self._thread = threading.Thread(target=self._loop, name="lorakit-tinker", daemon=True)
        self._thread.start()

    # --- model lifecycle (called from the HTTP side, in a worker thread) ----------------------------
    def create(self, model_id: str, session_id: str, base_model: Any, lora: dict,
               user_metadata: Optional[dict] = None, load_from: Optional[str] = None, with_optimizer: bool = False) -> dict:
        """Create a training model (fresh, or from a checkpoint for create-via-load)."""
        if model_id in self.models:
            return {"model_id": model_id}
        base = self.server.config.base_name
        directory = meta = None
        if load_from is not None:
            directory, _, _ = checkpoints.resolve(self.root, load_from)
            meta = checkpoints.read_meta(directory)
            lora = {**lora, **meta.get("lora", {})}
            if base_model is None:
                base_model = meta.get("base_model", base)
        if base_model != base:
            raise TinkerError(f"unknown base model {base_model!r}: this server trains {base!r} only")
        rank = lora.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise TinkerError(f"lora rank must be a positive integer, got {rank!r}")
        if rank > self.max_rank:
            raise TinkerError(f"lora rank {rank} exceeds this server's --max-lora-rank {self.max_rank}")
        flags = {k: bool(lora.get(k, True)) for k in ("train_mlp", "train_attn", "train_unembed")}
        if not any(flags.values()):
            raise TinkerError("at least one of train_mlp, train_attn, train_unembed must be true")
        seed = lora.get("seed")
        model = self.server.model
        targets = lora_targets(model, **flags)
        if not targets:
            raise TinkerError(f"no linear layer of this model matches {flags}", SERVER)
        config = LoraConfig(r=rank, alpha=LORA_ALPHA, target_modules=targets, task_type="CAUSAL_LM",
                            base_model_name_or_path=base)
        state = TrainingModel(model_id, session_id, {"rank": rank, "seed": seed, **flags}, user_metadata=user_metadata)

        def build() -> None:
            previous = active_adapters(model)
            try:
                if directory is not None:
                    read = read_adapter(directory)
                    load_read_adapter(model, read, adapter_name=model_id, trainable=True, activate=False)
                else:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed if isinstance(seed, int) else 0)
                        inject_lora(model, config, adapter_name=model_id, trainable=True)
                state.optimizer = AdapterOptimizer(model, model_id)
                if directory is not None and with_optimizer:
                    state.optimizer.load_state_tensors(checkpoints.read_optimizer(directory))
            except Exception:
                if model_id in self.server.engine.adapters():
                    delete_adapter(model, model_id)
                raise
            finally:
                set_active_adapters(model, [n for n in previous if n in self.server.engine.adapters()])

        try:
            self.server.scheduler.exclusive(build)
        except (ValueError, FileNotFoundError) as err:
            raise TinkerError(f"cannot create model: {err}") from None
        with self._cond:
            self.models[model_id] = state
        return {"model_id": model_id}

    def info(self, model_id: str) -> dict:
        state = self.get(model_id)
        base = self.server.config.base_name
        arch = getattr(getattr(self.server.model, "config", None), "model_type", None)
        return {"type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": state.lora["rank"],
                "model_name": base, "model_data": {"arch": arch, "model_name": base, "tokenizer_id": base}}

    def get(self, model_id: Any) -> TrainingModel:
        with self._cond:
            state = self.models.get(model_id) if isinstance(model_id, str) else None
        if state is None:
            raise TinkerError(f"unknown model_id {model_id!r}: create it with create_lora_training_client first")
        return state

    def close_session(self, session_id: str) -> list[TrainingModel]:
        """Forget the session's models (their queued requests fail); returns them (adapters still loaded)."""
        with self._cond:
            gone = [m for m in self.models.values() if m.session_id == session_id]
            for state in gone:
                del self.models[state.model_id]
        for state in gone:
            for op in state.queue.values():
                self.futures.fail(op.record, TinkerError(f"the session of model {state.model_id} has ended"))
        return gone

    def drop_adapter(self, name: str) -> None:
        def drop() -> None:
            if name in self.server.engine.adapters():
                self.server.scheduler.fail_requests_using(name)
                delete_adapter(self.server.model, name)
        self.server.scheduler.exclusive(drop)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Queue requests without running them inside the block; on leaving, whatever is ready runs,
        several clients' forward/backward requests as one step (a maintenance pause; tests use it
        to make clients' requests arrive together)."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    # --- queue ----------------------------------------------------------------------------------------
    def submit(self, model_id: Any, seq: Any, kind: str, record: FutureRecord, payload: dict) -> None:
        """Queue a request; it runs once every request of its model before ``seq`` has."""
        state = self.get(model_id)
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise TinkerError(f"seq_id must be an integer, got {seq!r}")
        with self._cond:
            if seq < state.next_seq or seq in state.queue:
                raise TinkerError(f"seq_id {seq} of model {model_id} was already used (next expected: {state.next_seq})")
            state.queue[seq] = Op(kind, seq, record, payload)
            state.last_request = time.time()
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    ready = ([] if self._held else
                             [(m, m.queue.pop(m.next_seq)) for m in self.models.values() if m.next_seq in m.queue])
                    if ready:
                        break
                    self._cond.wait()
            ops = [op for _, op in ready]
            try:
                self._run_round(ops)
            except BaseException as err:  # a bug here must not leave clients polling forever
                for op in ops:
                    self.futures.fail(op.record, TinkerError(f"internal error: {type(err).__name__}: {err}", SERVER))
            finally:
                with self._cond:
                    for state, op in ready:
                        state.next_seq = op.seq + 1
                    self._cond.notify_all()

    def _run_round(self, ops: list[Op]) -> None:
        for kind, backward in (("fb", True), ("fwd", False)):
            group = [op for op in ops if op.kind == kind]
            if group:
                self._run_losses(group, backward)
        for op in ops:
            if op.kind in ("fb", "fwd"):
                continue
            try:
                value = getattr(self, f"_op_{op.kind}")(op)
            except TinkerError as err:
                self.futures.fail(op.record, err)
            except (ValueError, FileNotFoundError) as err:
                self.futures.fail(op.record, TinkerError(str(err)))
            except Exception as err:
                self.futures.fail(op.record, TinkerError(f"internal error: {type(err).__name__}: {err}", SERVER))
            else:
                self.futures.resolve(op.record, value)

    def _run_losses(self, ops: list[Op], backward: bool) -> None:
        """Several clients' forward(/backward) requests as one mixed-adapter batch; a request whose
        input is wrong fails alone, before the batch runs."""
        valid: list[tuple[Op, LossRequest]] = []
        vocab = self.server.vocab_size
        for op in ops:
            try:
                state = self.get(op.payload["model_id"])
                loss_fn, config, data = op.payload["loss_fn"], op.payload["loss_fn_config"], op.payload["data"]
                try:
                    check_loss(loss_fn, config)
                except ValueError as err:
                    raise TinkerError(str(err)) from None
                if not data:
                    raise TinkerError("forward_backward got no data")
                for i, datum in enumerate(data):
                    try:
                        check_datum(datum, loss_fn, vocab, f"data[{i}]", self.max_tokens)
                    except ValueError as err:
                        raise TinkerError(str(err)) from None
                valid.append((op, LossRequest(state.adapter, data, loss_fn, config)))
            except TinkerError as err:
                self.futures.fail(op.record, err)
        if not valid:
            return
        try:
            results = self.server.scheduler.exclusive(
                lambda: forward_backward(self.server.model, [r for _, r in valid], self.pad_id, backward=backward))
        except Exception as err:
            for op, _ in valid:
                self.futures.fail(op.record, TinkerError(f"forward_backward failed: {type(err).__name__}: {err}", SERVER))
            return
        self.steps += 1
        self.largest_step = max(self.largest_step, len(valid))
        for (op, request), result in zip(valid, results):
            outputs = {"logprobs": result.logprobs}
            if request.loss_fn == "cross_entropy":
                outputs["elementwise_loss"] = [-(lp * d.inputs["weights"]) for lp, d in zip(result.logprobs, request.data)]
            self.futures.resolve(op.record, encode_forward_backward(outputs, len(request.data), {"loss:sum": result.loss}))

    # --- operations (dispatcher thread) -----------------------------------------------------------------
    def _op_optim(self, op: Op) -> dict:
        state = self.get(op.payload["model_id"])
        params = op.payload["adam_params"]
        try:
            hp = AdamStep(**{k: float(params[k]) for k in params if k in AdamStep.__dataclass_fields__})
        except (TypeError, ValueError) as err:
            raise TinkerError(f"invalid adam_params: {err}") from None
        metrics = self.server.scheduler.exclusive(lambda: state.optimizer.step(hp))
        return {"metrics": {"optim/grad_norm:mean": metrics["grad_norm"]}}

    def _adapter_files(self, state: TrainingModel) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        from ...lora import adapter_configs

        def grab() -> tuple[LoraConfig, dict[str, torch.Tensor]]:
            return adapter_configs(self.server.model)[state.adapter], adapter_state_dict(self.server.model, state.adapter)
        return self.server.scheduler.exclusive(grab)

    def _meta(self, state: TrainingModel) -> dict:
        return {"base_model": self.server.config.base_name, "model_id": state.model_id, "lora": state.lora,
                "lora_alpha": LORA_ALPHA, "time": time.time()}

    def _op_save_state(self, op: Op) -> dict:
        state = self.get(op.payload["model_id"])
        name = checkpoints.check_name(op.payload.get("path"))
        config, tensors = self._adapter_files(state)
        optimizer = self.server.scheduler.exclusive(state.optimizer.state_tensors)
        directory = self.root / state.model_id / "weights" / name
        checkpoints.write(directory, config, tensors, self._meta(state), optimizer, bool(op.payload.get("overwrite")))
        path = checkpoints.tinker_path(state.model_id, "weights", name)
        state.checkpoints.append({"checkpoint_id": f"weights/{name}", "checkpoint_type": "training", "tinker_path": path,
                                  "time": time.time()})
        return {"type": "save_weights", "path": path}

    def _op_save_sampler(self, op: Op) -> dict:
        state = self.get(op.payload["model_id"])
        name = op.payload.get("path")
        if name is None:  # an ephemeral snapshot for a sampling client: a frozen copy of the adapter now
            config, tensors = self._adapter_files(state)
            with self._cond:
                self._snapshots += 1
                snapshot = f"{state.model_id}-sampler-{self._snapshots}"
            read = (config, {k[len(PEFT_PREFIX):]: v.clone() for k, v in tensors.items()}, "snapshot")

            def load() -> None:
                previous = active_adapters(self.server.model)
                load_read_adapter(self.server.model, read, adapter_name=snapshot, trainable=False, activate=False)
                set_active_adapters(self.server.model, previous)
            self.server.scheduler.exclusive(load)
            return {"type": "save_weights_for_sampler", "sampling_session_id": self.on_snapshot(state, snapshot)}
        name = checkpoints.check_name(name)
        config, tensors = self._adapter_files(state)
        directory = self.root / state.model_id / "sampler_weights" / name
        checkpoints.write(directory, config, tensors, self._meta(state), None, overwrite=True)
        path = checkpoints.tinker_path(state.model_id, "sampler_weights", name)
        state.checkpoints.append({"checkpoint_id": f"sampler_weights/{name}", "checkpoint_type": "sampler",
                                  "tinker_path": path, "time": time.time()})
        return {"type": "save_weights_for_sampler", "path": path}

    def _op_load(self, op: Op) -> dict:
        state = self.get(op.payload["model_id"])
        path = op.payload.get("path")
        directory, _, _ = checkpoints.resolve(self.root, path)
        with_optimizer = bool(op.payload.get("optimizer"))
        optimizer_state = checkpoints.read_optimizer(directory) if with_optimizer else None
        _, tensors, _ = read_adapter(directory)

        def load() -> None:
            set_adapter_weights(self.server.model, tensors, state.adapter)  # checks every key and shape first
            state.optimizer.zero_grad()
            if optimizer_state is not None:
                state.optimizer.load_state_tensors(optimizer_state)
            else:
                state.optimizer.optimizer.state.clear()
        try:
            self.server.scheduler.exclusive(load)
        except ValueError as err:
            raise TinkerError(f"cannot load {path!r} into model {state.model_id}: {err}") from None
        return {"type": "load_weights", "path": path, "model_id": state.model_id}

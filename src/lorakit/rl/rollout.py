"""Rollout backends for RL: sample completions from the current policy, given only adapter weights.

Every backend has the same two calls, so the GRPO recipe never asks which one it drives:
``sync(update)`` hands it a ``PolicyUpdate`` (the policy version, i.e. the training step, the
adapter's tensors and their fingerprint) and ``generate(prompts, params)`` samples token ids with
their log-probs. ``LocalRollout`` drives lorakit's generation engine in the training process;
``ServerRollout`` talks to any OpenAI-compatible server that can load LoRA adapters at run time
(``/v1/load_lora_adapter``: ``lorakit serve``, vLLM with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``);
``lorakit.rl.vllm_rollout.VllmRollout`` runs vLLM in this process. Whichever it is, the base never
travels: after an update the backend receives the adapter alone (or, for vLLM's merged sync, the
merged weights of the adapted layers).

``PolicySampler`` sits in front of the backend: it gathers the adapter once per step, and stamps
each batch it returns with the version of the last sync and the fingerprint the backend reports for
the adapter it actually holds, computed on the backend's side (``held``): ``lorakit serve`` hashes
the weights it read, vLLM's hand-over hashes the file vLLM was given, a local backend reports its
own tensors. ``check_batch`` compares that with the trainer's own, so a stale backend is caught
rather than trained on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Protocol, Sequence

import torch
from torch import nn

from ..distributed import DistInfo, barrier, broadcast_from_main, gather_objects, gather_to_main
from ..generation import Engine, Request, SamplingParams
from ..lora import (LoraConfig, adapter_configs, adapter_fingerprint, adapter_stamp, adapter_state_dict, final_adapter,
                    initial_adapter, write_adapter)
from ..lora.io import PEFT_PREFIX, _adapter_tensors

@dataclass
class RolloutCompletion:
    """One sampled completion as the trainer sees it (what a rollout backend returns for one prompt).

    Unlike the generation engine's ``Completion``, the stop token is part of ``token_ids`` (it is
    trained on) and ``logprobs`` lines up with ``token_ids``.
    """

    token_ids: list[int]
    """Completion tokens, ending with the end-of-sequence token when the model stopped by itself."""
    text: str
    """The completion's text (special tokens left out)."""
    logprobs: Optional[list[float]]
    """The backend's log-prob of each token (raw model distribution), when it reported them all."""
    finish_reason: str
    """'stop' (the model ended it), 'length' (cut at max_new_tokens) or 'abort' (the backend gave up on
    the request; never trained on: ``lorakit.rl.trained_completions``)."""


def finish_reason(reason: Optional[str]) -> str:
    """A backend's finish reason as the trainer reads it: 'stop', 'length', or 'abort' for anything
    else a backend reports (vLLM's 'abort', an 'error'); a missing one is 'length' (the OpenAI
    protocol leaves it out only while a sequence is still running)."""
    if reason is None or reason in ("stop", "length"):
        return reason or "length"
    return "abort"


class StaleRolloutError(RuntimeError):
    """A rollout batch did not come from the policy the trainer holds (a skipped or failed adapter sync)."""


def shard_fingerprint(model: nn.Module, adapter: str, info: DistInfo) -> str:
    """A fingerprint of ``adapter``'s weights that no rank gathers: under FSDP2 each rank hashes its
    own shards and the per-rank digests (8 bytes each) are combined; otherwise the main rank hashes
    the adapter (every rank holds it whole) and sends the digest. Equal iff the weights are, for a
    given sharding (it is not ``adapter_fingerprint`` of the whole)."""
    tensors = _adapter_tensors(model, adapter)
    if not any(hasattr(v, "to_local") for v in tensors.values()):
        return broadcast_from_main(adapter_fingerprint(tensors) if info.main else None, info)
    local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in tensors.items()}
    digests = gather_objects(adapter_fingerprint(local), info)
    return hashlib.blake2b("/".join(digests).encode(), digest_size=8).hexdigest()


def final_adapter_on_main(model: nn.Module, adapter: str, info: DistInfo) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """``final_adapter`` assembled on the main rank only (the others get the config and no tensors):
    each rank sends its shards to rank 0 (``gather_to_main``), so no other rank receives the adapter."""
    from ..lora.residual import is_residual_init, to_plain_lora

    config = adapter_configs(model)[adapter]
    tensors = gather_to_main({PEFT_PREFIX + k: v for k, v in _adapter_tensors(model, adapter).items()}, info)
    if tensors is None:
        return config, {}
    if not is_residual_init(config.init_lora_weights):
        return config, tensors
    return to_plain_lora(config, tensors, initial_adapter(model, adapter))


@dataclass
class PolicyUpdate:
    """What a sync hands a rollout backend: one version of the policy."""

    version: int
    """The policy version: training steps done when the adapter was taken."""
    fingerprint: str
    """``adapter_fingerprint`` of the trained adapter's tensors at that version (``adapter_stamp`` of
    them for a backend on the policy's own weights)."""
    config: Optional[LoraConfig] = None
    """The adapter's config (plain LoRA relative to the untouched base for 'lora' payloads)."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """What the backend asked for (``payload``): PEFT-keyed adapter tensors ('lora', 'live'), or
    nothing ('merged': see ``weights``; 'none': the backend reads the policy's own weights)."""
    weights: Optional[Iterator[tuple[str, torch.Tensor]]] = None
    """'merged': the adapted layers' base weights with the adapter merged (fp32 math), in the backend's
    ``weights_dtype``, under the base checkpoint's names, one layer at a time: a stream to consume
    once, in order, keeping no weight after loading it (so at most one merged layer is alive)."""


class RolloutBackend(Protocol):
    """The interface every rollout backend has (``rollout.backend``: local, server, vllm)."""

    payload: Literal["none", "live", "lora", "merged"]
    """What ``sync`` needs in ``PolicyUpdate.tensors``."""
    version: Optional[int]
    """The version of the last update the backend was handed (None before the first)."""

    def sync(self, update: PolicyUpdate) -> None:
        """Make ``update`` the policy that ``generate`` samples."""

    def held(self) -> Optional[str]:
        """The fingerprint of the adapter the backend samples with now, computed on the backend's side
        from what it actually holds (never the trainer's value handed back); None when the backend
        cannot tell (a server that reports no fingerprints, vLLM's merged weights)."""

    def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list["RolloutCompletion"]:
        """Complete ``prompts[i]`` with ``params[i]`` (token ids with their log-probs)."""

    def close(self) -> None:
        """Free what the backend holds for this run."""


# The name before rollout backends and lorakit's generation engine had distinct names.
RolloutEngine = RolloutBackend


class LocalRollout:
    """Generate with lorakit's generation engine (``Engine``) on a model in this process.

    ``model`` may be the policy itself (nothing to send after an update: it is the same weights) or
    a separate copy whose adapter ``sync`` overwrites in place. An FSDP2-sharded policy is sampled
    by all ranks together (``lockstep``, ``within``): every forward is a collective.
    """

    def __init__(self, model: Any, tokenizer: Any, adapter: str, max_batch: int = 64,
                 shares_policy: bool = False, lockstep: Optional[Callable[[bool], bool]] = None,
                 within: Optional[Callable[[Callable[[], Any]], Any]] = None) -> None:
        """``shares_policy``: ``model`` is the policy itself (a sync has nothing to copy). ``lockstep``
        and ``within`` are for a policy sharded with FSDP2, sampled by all ranks together:
        ``lockstep`` is the engine's (``Engine``), also used to agree on the number of batches;
        ``within(fn)`` runs ``fn`` where the model may run forwards (inside the FSDP2 root's forward)."""
        self.engine = Engine(model, tokenizer, lockstep=lockstep)
        self.adapter = adapter
        self.max_batch = max_batch
        self.lockstep = lockstep
        self.within = within
        self.payload: Literal["none", "live"] = "none" if shares_policy else "live"
        self.version: Optional[int] = None
        self._hashed: tuple[str, str] = ("", "")  # (stamp, fingerprint) of this backend's own adapter tensors

    def sync(self, update: PolicyUpdate) -> None:
        """Copy the new adapter weights in (none to copy when the backend shares the policy's weights)."""
        if self.payload == "live":
            self.engine.update_adapter(self.adapter, update.tensors)
        self.version = update.version

    def held(self) -> str:
        """On the policy's own weights: the stamp of the tensors this backend samples with (which
        tensors, written how often; the sampler compares it with the policy's at sync, so a write
        after the sync shows). On a copy: the fingerprint of the copy's weights, hashed again only
        when a tensor of it was written."""
        stamp = adapter_stamp(self.engine.model, self.adapter)
        if self.payload == "none":
            return stamp
        if self._hashed[0] != stamp:
            self._hashed = (stamp, adapter_fingerprint(_adapter_tensors(self.engine.model, self.adapter)))
        return self._hashed[1]

    def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
                 adapter: Optional[str] = "") -> list[RolloutCompletion]:
        """Complete ``prompts[i]`` with ``params[i]``; ``adapter`` '' means the policy's, None the base."""
        if self.within is not None:
            return self.within(lambda: self._generate(prompts, params, adapter))
        return self._generate(prompts, params, adapter)

    def _generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
                  adapter: Optional[str]) -> list[RolloutCompletion]:
        adapter = self.adapter if adapter == "" else adapter
        out: list[RolloutCompletion] = []
        start = 0
        while True:  # in lockstep, a rank whose prompts are done joins the others' batches (empty)
            more = start < len(prompts)
            if self.lockstep is not None:
                more = self.lockstep(more)
            if not more:
                return out
            requests = [Request(list(p), adapter, q) for p, q in
                        zip(prompts[start:start + self.max_batch], params[start:start + self.max_batch])]
            start += self.max_batch
            for done in self.engine.generate(requests):
                ids, logprobs = list(done.token_ids), list(done.logprobs)
                if done.stop_token_id is not None:
                    ids.append(done.stop_token_id)
                    logprobs.append(float(done.stop_logprob))
                out.append(RolloutCompletion(ids, done.text, logprobs, done.finish_reason))

    def close(self) -> None:
        """Nothing to free: the generation engine lives and dies with the run."""


class RolloutServerError(ConnectionError):
    """The rollout server refused a request or could not be reached; the message says which and why."""


class ServerRollout:
    """Generate through an OpenAI-compatible server that hot-loads LoRA adapters.

    ``sync`` writes the adapter to ``adapter_dir/<name>-step<version>`` (the server must see that
    filesystem), loads it under that name and unloads the previous one, so the server holds one
    policy version at a time. Requests send prompts as token ids and ask for token-id logprobs
    (vLLM's ``return_tokens_as_token_ids``), so the trainer sees exactly the sampled tokens. Under
    torchrun every rank has one; only the one with ``main`` writes and loads (the sampler puts a
    barrier after the sync, so no rank samples before the server holds the adapter).
    """

    payload: Literal["lora"] = "lora"
    tensors_on: Literal["main"] = "main"
    """Only the main rank loads the adapter (``sync`` on the others records the name alone)."""

    def __init__(self, base_url: str, adapter_dir: Path, eos_token_ids: Sequence[int], api_key: Optional[str] = None,
                 timeout_s: float = 600.0, concurrency: int = 16, name: str = "policy", main: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.adapter_dir = Path(adapter_dir)
        self.eos = {int(i) for i in eos_token_ids}
        self.default_eos = int(eos_token_ids[0])  # appended when a server leaves the stop token out
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.name = name
        self.main = main
        self.current: Optional[str] = None
        """The server's name for the adapter this backend samples with."""
        self.version: Optional[int] = None

    def _post(self, path: str, body: Optional[dict[str, Any]]) -> dict[str, Any]:
        """POST ``body`` to ``path`` (GET when ``body`` is None); the reply's JSON."""
        url = f"{self.base_url}{path}"
        request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                         method="GET" if body is None else "POST",
                                         headers={"Content-Type": "application/json"})
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise RolloutServerError(f"rollout server {url}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RolloutServerError(f"rollout server {url} is unreachable: {reason}") from None
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {"text": text}  # vLLM answers load/unload with plain text

    def load(self, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> str:
        """Write adapter ``name`` and make the server load it in place of the previous one; returns the name."""
        path = write_adapter(self.adapter_dir / name, config, tensors)
        body = {"lora_name": name, "lora_path": str(path.resolve())}
        try:
            self._post("/load_lora_adapter", body)
        except RolloutServerError as err:
            if "already" not in str(err):
                raise
            # Left over from an interrupted run that this one resumes: replace it.
            self._post("/unload_lora_adapter", {"lora_name": name})
            self._post("/load_lora_adapter", body)
        previous, self.current = self.current, name
        if previous is not None and previous != name:
            self.unload(previous)
        return name

    def sync(self, update: PolicyUpdate) -> None:
        """Load ``update``'s adapter as ``<name>-step<version>`` (on the main rank; the others only record it)."""
        name = f"{self.name}-step{update.version}"
        if self.main:
            if update.config is None:
                raise ValueError("ServerRollout.sync: the update carries no adapter config")
            self.load(name, update.config, update.tensors)
        self.current = name
        self.version = update.version

    def held(self) -> Optional[str]:
        """The fingerprint the server reports (``/v1/models``) for the weights it loaded under this
        backend's adapter name; None when the server reports none (vLLM's server)."""
        if self.current is None:
            return None
        for entry in self._post("/models", None).get("data") or []:
            if entry.get("id") == self.current:
                return entry.get("fingerprint")
        return f"absent: the server holds no adapter named {self.current!r}"

    def unload(self, name: str) -> None:
        try:
            self._post("/unload_lora_adapter", {"lora_name": name})
        except RolloutServerError:
            pass  # already gone: nothing to free
        shutil.rmtree(self.adapter_dir / name, ignore_errors=True)

    def _one(self, model: str, prompt: list[int], params: SamplingParams) -> RolloutCompletion:
        body: dict[str, Any] = {
            "model": model, "prompt": list(prompt), "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "logprobs": 1,
            "return_tokens_as_token_ids": True,
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        reply = self._post("/completions", body)
        try:
            choice = reply["choices"][0]
            text, finish = choice.get("text") or "", finish_reason(choice.get("finish_reason"))
            logprobs = choice.get("logprobs") or {}
            tokens = logprobs.get("tokens")
            if tokens is None:
                raise KeyError("logprobs.tokens")
            ids = [int(str(t).split(":", 1)[1]) for t in tokens]
            lps: Optional[list[float]] = [float(x) for x in logprobs.get("token_logprobs") or []]
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise RolloutServerError(f"rollout server {self.base_url}: unexpected completion reply ({err}); it must "
                                     "support logprobs with return_tokens_as_token_ids") from None
        if finish == "stop" and (not ids or ids[-1] not in self.eos):
            ids.append(self.default_eos)
            lps = None
        if lps is not None and len(lps) != len(ids):
            lps = None
        return RolloutCompletion(ids, text, lps, finish)

    def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
                 model: Optional[str] = None) -> list[RolloutCompletion]:
        """Sample ``prompts[i]`` with ``params[i]``, many requests at once, from server model ``model``
        (default: the adapter of the last sync)."""
        model = model or self.current
        if model is None:
            raise RuntimeError("ServerRollout.generate before sync: the server holds no adapter of this run")
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda pq: self._one(model, *pq), zip(prompts, params)))

    def close(self) -> None:
        """Unload this run's adapter from the server (the main rank does)."""
        if self.main and self.current is not None:
            self.unload(self.current)
        self.current = None


class PolicySampler:
    """Sample from the policy as it is after a given training step, through any rollout backend.

    ``sync(step)`` hands the backend the policy adapter's current weights, at most once per step, as
    the backend's ``payload`` asks: nothing for a local backend on the policy's own weights, the live
    tensors for a local copy, plain LoRA (PiSSA/OLoRA converted) for a server or vLLM, or merged
    weights. Every rank calls ``sync`` (gathering a sharded adapter is a collective) and a barrier
    follows it, so no rank samples before a shared server holds the new adapter. What travels does
    not grow with the world size where it need not: nothing is gathered for a backend on the
    policy's own weights (its fingerprint is each rank's ``adapter_stamp``) or for merged weights
    (their fingerprint combines per-shard digests), a
    server's adapter is assembled on the main rank alone, and a whole adapter is hashed on the main
    rank only (the digest is broadcast).

    ``generate`` returns a ``RolloutBatch`` stamped with the version and fingerprint the backend says
    it sampled with; ``check_batch`` compares them with what the trainer synced. Calls are serialised
    by a lock, so ``generate`` may run in a background thread (async rollouts) while the main thread
    trains and evaluates.
    """

    def __init__(self, backend: RolloutBackend, policy: nn.Module, adapter: str, info: Optional[DistInfo] = None) -> None:
        self.backend = backend
        self.policy = policy
        self.adapter = adapter
        self.info = info or DistInfo()
        self.synced_step: Optional[int] = None
        self.fingerprints: dict[int, str] = {}
        """Version -> fingerprint of every adapter this sampler synced (for a backend on the policy's
        own weights, their ``adapter_stamp``: nothing is gathered or hashed)."""
        self.lock = threading.Lock()
        self.sync_s = 0.0
        """Seconds the last sync took (gather, fingerprint, transfer, load)."""

    @property
    def engine(self) -> RolloutBackend:
        """The old name of ``backend``."""
        return self.backend

    def sync(self, step: int) -> None:
        """Give the backend the adapter as it is after ``step`` steps (a repeated step is a no-op)."""
        if self.synced_step == step:
            return
        start = time.perf_counter()
        payload = self.backend.payload
        if payload == "lora" and getattr(self.backend, "tensors_on", "every") == "main":
            # A server is loaded by the main rank alone: the others send their shards and keep nothing.
            config, tensors = final_adapter_on_main(self.policy, self.adapter, self.info)
            fingerprint = broadcast_from_main(adapter_fingerprint(tensors) if self.info.main else None, self.info)
        elif payload in ("lora", "live"):  # every rank's backend holds the whole adapter (vLLM per rank, a copy)
            config, tensors = (final_adapter(self.policy, self.adapter) if payload == "lora"  # PiSSA/OLoRA: plain LoRA
                               else (adapter_configs(self.policy)[self.adapter], adapter_state_dict(self.policy, self.adapter)))
            fingerprint = broadcast_from_main(adapter_fingerprint(tensors) if self.info.main else None, self.info)
        elif payload == "none":  # the backend samples these very tensors: they must stay unwritten until it does
            # The stamp of this rank's own tensors (what the backend's ``held`` reports): nothing gathered.
            config, tensors = adapter_configs(self.policy)[self.adapter], {}
            fingerprint = adapter_stamp(self.policy, self.adapter)
        else:  # 'merged': no adapter tensors travel, nothing is gathered for the fingerprint
            config, tensors = adapter_configs(self.policy)[self.adapter], {}
            fingerprint = shard_fingerprint(self.policy, self.adapter, self.info)
        weights = None
        if payload == "merged":
            from ..lora import iter_merged_weights
            from ..models.checkpoint_names import checkpoint_weights

            weights = checkpoint_weights(self.policy, iter_merged_weights(
                self.policy, self.adapter, getattr(self.backend, "weights_dtype", None)))
        with self.lock:
            self.backend.sync(PolicyUpdate(step, fingerprint, config, tensors, weights))
        barrier(self.info)
        self.synced_step = step
        self.fingerprints[step] = fingerprint
        self.sync_s = time.perf_counter() - start

    def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> "RolloutBatch":
        """Complete ``prompts[i]`` with ``params[i]`` using the adapter of the last ``sync``.

        The batch carries what the backend reported holding before and after sampling; when the two
        differ (the adapter changed under the batch) it carries both, so no fingerprint matches.
        """
        with self.lock:
            if self.backend.version is None:
                raise RuntimeError("PolicySampler.generate before sync: the rollout backend holds no adapter of this run")
            version, before = self.backend.version, self.backend.held()
            completions = self.backend.generate(prompts, params)
            after = self.backend.held()
        held = before if after == before else f"{before} then {after} (changed while sampling)"
        return RolloutBatch(completions, version, held)

    def check_batch(self, batch: "RolloutBatch", version: int) -> Optional[str]:
        """Why ``batch`` is not from policy ``version`` as this sampler synced it (None: it is, or the
        backend cannot tell which adapter it holds: ``batch.fingerprint`` None)."""
        if batch.version != version:
            return (f"the rollout batch was sampled by policy version {batch.version}, but the trainer expected "
                    f"version {version}: the adapter sync for step {version} did not reach the "
                    f"{type(self.backend).__name__} rollout backend")
        expected = self.fingerprints.get(version)
        if batch.fingerprint is not None and batch.fingerprint != expected:
            return (f"the {type(self.backend).__name__} rollout backend reports holding adapter {batch.fingerprint}, not the "
                    f"trainer's {expected} of version {version}: it is sampling another adapter than the one synced")
        return None

    def close(self) -> None:
        """Free what the backend holds for this run (a server's adapter; a vLLM instance)."""
        with self.lock:
            self.backend.close()


@dataclass
class RolloutBatch:
    """Completions from one ``PolicySampler.generate`` call, and which policy sampled them.

    Iterates, indexes and has a length like the list of completions it holds.
    """

    completions: list[RolloutCompletion]
    version: int
    """The policy version (training steps) of the last sync the backend was handed."""
    fingerprint: Optional[str]
    """The fingerprint of the adapter the backend reported holding while it sampled (``held``); None
    when the backend cannot tell."""

    def __len__(self) -> int:
        return len(self.completions)

    def __iter__(self) -> Iterator[RolloutCompletion]:
        return iter(self.completions)

    def __getitem__(self, index: int) -> RolloutCompletion:
        return self.completions[index]

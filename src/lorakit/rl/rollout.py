"""Rollout engines for RL: sample completions from the current policy, given only adapter weights.

``LocalRollout`` drives lorakit's generation engine in the training process; ``ServerRollout``
talks to any OpenAI-compatible server that can load LoRA adapters at run time
(``/v1/load_lora_adapter``: ``lorakit serve``, vLLM with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``). Either
way the base model never travels: after an update the engine receives the adapter alone.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..distributed import DistInfo, barrier
from ..generation import Engine, Request, SamplingParams
from ..lora import LoraConfig, adapter_state_dict, final_adapter, write_adapter


@dataclass
class RolloutCompletion:
    """One sampled completion as the trainer sees it (what a rollout engine returns for one prompt).

    Unlike the generation engine's ``Completion``, the stop token is part of ``token_ids`` (it is
    trained on) and ``logprobs`` lines up with ``token_ids``.
    """

    token_ids: list[int]
    """Completion tokens, ending with the end-of-sequence token when the model stopped by itself."""
    text: str
    """The completion's text (special tokens left out)."""
    logprobs: Optional[list[float]]
    """The engine's log-prob of each token (raw model distribution), when it reported them all."""
    finish_reason: str
    """'stop' (the model ended it) or 'length' (cut at max_new_tokens)."""


class LocalRollout:
    """Generate with lorakit's engine on a model in this process.

    ``model`` may be the policy itself (nothing to send after an update: it is the same weights) or
    a separate copy whose adapter ``sync`` overwrites in place. An FSDP2-sharded policy is sampled
    by all ranks together (``lockstep``, ``within``): every forward is a collective.
    """

    def __init__(self, model: Any, tokenizer: Any, adapter: str, max_batch: int = 64,
                 lockstep: Optional[Callable[[bool], bool]] = None,
                 within: Optional[Callable[[Callable[[], Any]], Any]] = None) -> None:
        """``lockstep`` and ``within`` are for a policy sharded with FSDP2, sampled by all ranks
        together: ``lockstep`` is the engine's (``Engine``), also used to agree on the number of
        batches; ``within(fn)`` runs ``fn`` where the model may run forwards (inside the FSDP2 root's
        forward)."""
        self.engine = Engine(model, tokenizer, lockstep=lockstep)
        self.adapter = adapter
        self.max_batch = max_batch
        self.lockstep = lockstep
        self.within = within

    def sync(self, tensors: Optional[dict[str, torch.Tensor]]) -> None:
        """Copy new adapter weights in (None: the engine shares the policy's weights)."""
        if tensors is not None:
            self.engine.update_adapter(self.adapter, tensors)

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


class RolloutServerError(ConnectionError):
    """The rollout server refused a request or could not be reached; the message says which and why."""


class ServerRollout:
    """Generate through an OpenAI-compatible server that hot-loads LoRA adapters.

    ``sync`` writes the adapter to ``adapter_dir/<name>`` (the server must see that filesystem),
    loads it as ``<name>`` and unloads the previous one, so the server holds one policy version at
    a time. Requests send prompts as token ids and ask for token-id logprobs (vLLM's
    ``return_tokens_as_token_ids``), so the trainer sees exactly the sampled tokens.
    """

    def __init__(self, base_url: str, adapter_dir: Path, eos_token_ids: Sequence[int], api_key: Optional[str] = None,
                 timeout_s: float = 600.0, concurrency: int = 16) -> None:
        self.base_url = base_url.rstrip("/")
        self.adapter_dir = Path(adapter_dir)
        self.eos = set(eos_token_ids)
        self.default_eos = eos_token_ids[0]  # appended when a server leaves the stop token out
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.current: Optional[str] = None

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
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

    def sync(self, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> str:
        """Write adapter ``name`` and make the server load it; returns the name to sample with."""
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
            text, finish = choice.get("text") or "", choice.get("finish_reason") or "length"
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

    def generate(self, model: str, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[RolloutCompletion]:
        """Sample ``prompts[i]`` with ``params[i]`` from server model ``model``, many requests at once."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda pq: self._one(model, *pq), zip(prompts, params)))


class PolicySampler:
    """Sample from the policy as it is after a given training step, through either rollout engine.

    ``sync(step)`` hands the engine the policy adapter's current weights, at most once per step:
    nothing for a ``LocalRollout`` on the policy's own model (it reads the same weights), a copy
    into a ``LocalRollout`` on a separate model, or, for a ``ServerRollout``, a new adapter
    ``<name>-step<step>`` that the server loads in place of the previous one. Every rank calls
    ``sync``: gathering a sharded adapter is a collective, and no rank may sample before the server
    holds the new adapter; rank 0 alone talks to the server.
    """

    def __init__(self, engine: Union[LocalRollout, ServerRollout], policy: nn.Module, adapter: str,
                 info: Optional[DistInfo] = None, name: str = "policy") -> None:
        self.engine = engine
        self.policy = policy
        self.adapter = adapter
        self.info = info or DistInfo()
        self.name = name
        self.synced_step: Optional[int] = None
        self.serving: Optional[str] = None
        """The server's name for the adapter it samples with (server engine only)."""

    def sync(self, step: int) -> None:
        """Give the engine the adapter as it is after ``step`` steps (a repeated step is a no-op)."""
        if self.synced_step == step:
            return
        self.synced_step = step
        if isinstance(self.engine, ServerRollout):
            config, tensors = final_adapter(self.policy, self.adapter)  # PiSSA/OLoRA: plain LoRA for the server's base
            name = f"{self.name}-step{step}"
            if self.info.main:
                self.engine.sync(name, config, tensors)
            barrier(self.info)
            self.serving = name
        elif self.engine.engine.model is not self.policy:
            self.engine.sync(adapter_state_dict(self.policy, self.adapter))

    def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[RolloutCompletion]:
        """Complete ``prompts[i]`` with ``params[i]`` using the adapter of the last ``sync``."""
        if isinstance(self.engine, ServerRollout):
            if self.serving is None:
                raise RuntimeError("PolicySampler.generate before sync: the server holds no adapter of this run")
            return self.engine.generate(self.serving, prompts, params)
        return self.engine.generate(prompts, params)

    def close(self) -> None:
        """Free what the engine holds for this run (the server's adapter; rank 0 unloads it)."""
        if isinstance(self.engine, ServerRollout) and self.info.main and self.engine.current is not None:
            self.engine.unload(self.engine.current)

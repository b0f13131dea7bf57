"""Runs under torchrun (2 ranks, gloo, FSDP2) for tests/test_sync_bytes.py.

Counts the bytes each rank receives through collectives (every c10d op the process dispatches,
DTensor gathers included) while the GRPO sampler syncs each kind of engine and while a checkpoint
is saved, and checks that the saved checkpoint resumes the optimizer exactly. Results go to
result_rank<r>.json in --out; the pytest side asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--tokenizer", required=True)
ARGS = parser.parse_args()

dist.init_process_group("gloo")
RANK = dist.get_rank()

from lorakit import LoraConfig  # noqa: E402
from lorakit.distributed import DistInfo, LossModule, any_rank, through_root, wrap  # noqa: E402
from lorakit.lora import inject_lora  # noqa: E402
from lorakit.models import load_tokenizer  # noqa: E402
from lorakit.rl import LocalRollout, PolicySampler  # noqa: E402
from lorakit.training import load_checkpoint_state, save_checkpoint  # noqa: E402
from lorakit.training.loss import causal_lm_loss  # noqa: E402
from tests.models import tiny_qwen3  # noqa: E402


def _bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


class ReceivedBytes(TorchDispatchMode):
    """Bytes landing in this rank's buffers through communication: gather outputs, broadcast,
    all-reduce and point-to-point receive buffers (the receiving side of each)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if func.namespace == "c10d" and any(k in name for k in ("gather", "broadcast", "allreduce", "reduce_scatter",
                                                                 "recv", "alltoall")):
            self.total += _bytes(args[0])  # the output buffers (an input buffer where the op is in place)
        elif func.namespace == "_c10d_functional" and not name.startswith(("wait_tensor", "_wrap_tensor")):
            self.total += _bytes(out)
        return out


class MainOnlyServer:
    """Stands in for ``ServerRollout``'s sync (the main rank loads the adapter; a real server needs HTTP)."""

    payload = "lora"
    tensors_on = "main"

    def __init__(self) -> None:
        self.version = self.fingerprint = None
        self.received = 0

    def sync(self, update) -> None:
        self.received = sum(t.numel() * t.element_size() for t in update.tensors.values())
        self.version, self.fingerprint = update.version, update.fingerprint

    def close(self) -> None:
        pass


def run() -> dict:
    torch.manual_seed(0)
    model = tiny_qwen3(seed=1, vocab=96)
    inject_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear", init_lora_weights=False))
    adapter_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    info = DistInfo(RANK, dist.get_world_size(), 0, "fsdp2")
    root = wrap(LossModule(model.train(), causal_lm_loss), info, torch.device("cpu"), torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2's sharded parameters
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(10 + RANK)
    ids = torch.randint(0, 96, (2, 9))
    loss_sum, n = root({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    (loss_sum / n).backward()
    optimizer.step()
    result = {"adapter_bytes": adapter_bytes}

    tokenizer = load_tokenizer(ARGS.tokenizer)
    local = LocalRollout(model, tokenizer, "default", shares_policy=True, lockstep=any_rank(info, torch.device("cpu")),
                         within=lambda fn: through_root(root, info, lambda _m: fn()))
    fingerprints = []
    for step, engine in (("local", local), ("server", MainOnlyServer())):
        sampler = PolicySampler(engine, model, "default", info)
        with ReceivedBytes() as counted:
            sampler.sync(1)
        result[f"sync_{step}_bytes"] = counted.total
        fingerprints.append(sampler.fingerprints[1])
        if step == "server":
            result["server_tensor_bytes"] = engine.received
    result["fingerprints"] = fingerprints

    out = Path(ARGS.out)
    state = {"step": 1, "epoch": 0, "sample": 0, "tokens": 0}
    with ReceivedBytes() as counted:
        path = save_checkpoint(out / "run", 1, model, optimizer, state, info)
    result["checkpoint_bytes"] = counted.total

    fresh = torch.optim.AdamW(params, lr=1e-2)
    load_checkpoint_state(path, model, fresh, info)
    same = True
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            a, b = optimizer.state[p][key], fresh.state[p][key]
            a, b = (a.to_local() if hasattr(a, "to_local") else a), (b.to_local() if hasattr(b, "to_local") else b)
            same = same and torch.equal(a, b)
    result["optimizer_resumed_exactly"] = same
    return result


try:
    result = run()
except Exception:  # the test prints it
    result = {"error": traceback.format_exc()}
Path(ARGS.out, f"result_rank{RANK}.json").write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
# As tests/fsdp_units_worker.py: leave without the C++ static destructors (gloo + DTensor abort at exit).
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)

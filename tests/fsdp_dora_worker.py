"""Runs under torchrun (2 ranks, gloo) for tests/test_fsdp_dora.py.

A tiny Qwen3 with a DoRA adapter, wrapped by lorakit's FSDP2 ``wrap``, trains 2 optimizer steps of
3 micro-batches. Counted: how often a whole base weight is read to compute DoRA's row norms
(``dora.base_weight_fp32``), after the first micro-batch and at the end, and the gathered weight's
(data_ptr, _version) seen by each forward. Results go to results_rank<r>.json in --out.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
ARGS = parser.parse_args()

dist.init_process_group("gloo")
RANK = dist.get_rank()

from lorakit import LoraConfig  # noqa: E402
from lorakit.distributed import DistInfo, LossModule, wrap  # noqa: E402
from lorakit.lora import dora, inject_lora  # noqa: E402
from lorakit.training.loss import causal_lm_loss  # noqa: E402
from tests.models import tiny_qwen3  # noqa: E402

CALLS = {"n": 0}
_real = dora.base_weight_fp32


def _counting(layer):
    CALLS["n"] += 1
    return _real(layer)


dora.base_weight_fp32 = _counting  # a counter around the one function that reads a whole base weight


def run() -> dict:
    model = tiny_qwen3(seed=1, vocab=96)
    torch.manual_seed(2)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    layers = [m for m in model.modules() if hasattr(m, "lora_magnitude_vector")]
    info = DistInfo(RANK, dist.get_world_size(), 0, "fsdp2")
    root = wrap(LossModule(model.train(), causal_lm_loss), info, torch.device("cpu"), torch.float32)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    probe = layers[0]
    seen = []
    probe.register_forward_pre_hook(
        lambda m, _: seen.append([m.base_layer.weight.data_ptr(), m.base_layer.weight._version]))
    g = torch.Generator().manual_seed(10 + RANK)
    after_first = None
    for _ in range(2):
        for _ in range(3):
            ids = torch.randint(0, 96, (2, 8), generator=g)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            loss_sum, n = root(batch)
            (loss_sum / n).backward()
            if after_first is None:
                after_first = CALLS["n"]
        optimizer.step()
        optimizer.zero_grad()
    return {"layers": len(layers), "after_first": after_first, "end": CALLS["n"], "seen": seen}


out = Path(ARGS.out)
try:
    result = run()
except Exception:  # the test prints it
    result = {"error": traceback.format_exc()}
(out / f"results_rank{RANK}.json").write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # as tests/fsdp_units_worker.py: gloo + DTensor scripts can abort at interpreter exit

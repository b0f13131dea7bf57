"""Runs under torchrun (2 ranks, gloo) for tests/test_fsdp_units.py.

For an untied and a tied tiny Qwen3 with LoRA, wrapped by lorakit's FSDP2 ``wrap``: the loss and
the LoRA gradients against the same model run whole in this process (the oracle), and whether the
embedding and the head are sharded (DTensor parameters) at the points where FSDP2 used to keep them
gathered: inside the forward (after the embedding lookup), between forward and backward, and
inside the backward. Results go to
results_<tie>_rank<r>.json in --out; the pytest side asserts on them.
"""

from __future__ import annotations

import argparse
import copy
import json
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
from lorakit.distributed import DistInfo, LossModule, full_tensor, wrap  # noqa: E402
from lorakit.lora import inject_lora  # noqa: E402
from lorakit.training.loss import causal_lm_loss  # noqa: E402
from tests.models import tiny_qwen3  # noqa: E402


def sharded(module: torch.nn.Module) -> bool:
    return all(hasattr(p, "to_local") for p in module.parameters())


def check(tie: bool) -> dict:
    model = tiny_qwen3(seed=1, vocab=96, tie=tie)
    torch.manual_seed(2)
    # B random too, so every LoRA weight gets a gradient
    inject_lora(model, LoraConfig(r=4, alpha=8, init_lora_weights=False), adapter_name="default")
    reference = copy.deepcopy(model)
    torch.manual_seed(3)  # the same batch on both ranks: FSDP2's averaged gradient is the whole-model gradient
    ids = torch.randint(0, 96, (2, 12))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    ref_sum, ref_n = causal_lm_loss(reference.train(), batch)
    (ref_sum / ref_n).backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    info = DistInfo(RANK, dist.get_world_size(), 0, "fsdp2")
    root = wrap(LossModule(model.train(), causal_lm_loss), info, torch.device("cpu"), torch.float32)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    seen: dict[str, bool] = {}
    last, first = model.model.layers[-1], model.model.layers[0]
    last.register_full_backward_pre_hook(lambda *_: seen.update(in_backward_last=sharded(embed) and sharded(head)))
    first.register_full_backward_pre_hook(lambda *_: seen.update(in_backward_first=sharded(embed) and sharded(head)))
    first.register_forward_pre_hook(lambda *_: seen.update(in_forward=sharded(embed) and sharded(head)))
    loss_sum, n = root(batch)
    seen["after_forward"] = sharded(embed) and sharded(head)
    (loss_sum / n).backward()
    seen["after_backward"] = sharded(embed) and sharded(head)
    grads = {n: full_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad}
    return {
        "loss_diff": abs(loss_sum.item() - ref_sum.item()),
        "grad_names_match": sorted(grads) == sorted(ref_grads),
        "grad_diff": max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
        "lora_grads": len(ref_grads),
        **seen,
    }


out = Path(ARGS.out)
for tie in (False, True):
    try:
        result = check(tie)
    except Exception:  # the test prints it
        result = {"error": traceback.format_exc()}
    (out / f"results_{'tied' if tie else 'untied'}_rank{RANK}.json").write_text(json.dumps(result))
dist.destroy_process_group()

"""Runs under torchrun (2 ranks, gloo) for tests/test_fsdp_units.py.

For an untied and a tied tiny Qwen3 with LoRA, wrapped by lorakit's FSDP2 ``wrap``, with the same
batch on both ranks and with uneven ones (one rank without a labelled token): the loss, the LoRA
gradients and the sampler's log-probs against the same model run whole in this process (the
oracle), whether token lookups go to the shards, and whether the
embedding and the head are sharded (DTensor parameters) at the points where FSDP2 used to keep them
gathered: inside the forward (after the embedding lookup), between forward and backward, and
inside the backward. Results go to
results_<case>_rank<r>.json in --out; the pytest side asserts on them.
"""

from __future__ import annotations

import argparse
import copy
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
from lorakit.distributed import DistInfo, LossModule, full_tensor, through_root, wrap  # noqa: E402
from lorakit.distributed import vocab  # noqa: E402
from lorakit.lora import inject_lora  # noqa: E402
from lorakit.training.loss import causal_lm_loss, token_logprobs  # noqa: E402
from tests.models import tiny_qwen3  # noqa: E402


def sharded(module: torch.nn.Module) -> bool:
    return all(hasattr(p, "to_local") for p in module.parameters())


def batch_for(seed: int, length: int, unlabelled: int) -> dict:
    torch.manual_seed(seed)
    ids = torch.randint(0, 96, (2, length))
    labels = ids.clone()
    labels[:, :unlabelled] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def check(tie: bool, uneven: bool, long: bool = False) -> dict:
    """``uneven``: each rank its own batch (rank 1: other lengths, no labelled token at all), the
    summed loss; else the same batch on both ranks, the mean loss. ``long``: rows enough that the
    vocabulary-sharded loss gathers the head rather than exchanging the ranks' hidden rows."""
    model = tiny_qwen3(seed=1, vocab=96, tie=tie)
    torch.manual_seed(2)
    # B random too, so every LoRA weight gets a gradient
    inject_lora(model, LoraConfig(r=4, alpha=8, init_lora_weights=False), adapter_name="default")
    reference = copy.deepcopy(model)
    batches = [batch_for(3, 60 if long else 12, 3), batch_for(4, 7, 7 if uneven else 3)]
    mine = batches[RANK] if uneven else batches[0]

    # The oracle: FSDP2 averages gradients over the 2 ranks
    if uneven:
        ref_sums = [causal_lm_loss(reference.train(), b)[0] for b in batches]
        (sum(ref_sums) / 2).backward()
        ref_loss = ref_sums[RANK].item()
    else:
        ref_sum, ref_n = causal_lm_loss(reference.train(), mine)
        (ref_sum / ref_n).backward()
        ref_loss = ref_sum.item()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    with torch.no_grad():
        ref_logp = token_logprobs(reference.eval(), mine, temperature=0.7)

    info = DistInfo(RANK, dist.get_world_size(), 0, "fsdp2")
    root = wrap(LossModule(model.train(), causal_lm_loss), info, torch.device("cpu"), torch.float32)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    seen: dict[str, bool] = {"lookup_in_shards": type(embed).__name__ == "ShardedEmbedding"}
    last, first = model.model.layers[-1], model.model.layers[0]
    last.register_full_backward_pre_hook(lambda *_: seen.update(in_backward_last=sharded(embed) and sharded(head)))
    first.register_full_backward_pre_hook(lambda *_: seen.update(in_backward_first=sharded(embed) and sharded(head)))
    first.register_forward_pre_hook(lambda *_: seen.update(in_forward=sharded(embed) and sharded(head)))
    before = dict(vocab.stats)
    loss_sum, n = root(mine)
    seen["after_forward"] = sharded(embed) and sharded(head)
    (loss_sum if uneven else loss_sum / n).backward()
    seen["after_backward"] = sharded(embed) and sharded(head)
    grads = {n: full_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad}
    logp = through_root(root, info, lambda m: token_logprobs(m.eval(), mine, temperature=0.7))
    return {
        "head_gathers": vocab.stats["head_gathers"] - before["head_gathers"],
        "row_exchanges": vocab.stats["row_exchanges"] - before["row_exchanges"],
        "loss_diff": abs(loss_sum.item() - ref_loss),
        "grad_names_match": sorted(grads) == sorted(ref_grads),
        "grad_diff": max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
        "logprob_diff": (logp - ref_logp).abs().max().item() if len(ref_logp) else 0.0,
        "logprobs": len(ref_logp),
        "lora_grads": len(ref_grads),
        **seen,
    }


out = Path(ARGS.out)
for tie in (False, True):
    for uneven, long in ((False, False), (True, False), (False, True)):
        try:
            result = check(tie, uneven, long)
        except Exception:  # the test prints it
            result = {"error": traceback.format_exc()}
        name = f"{'tied' if tie else 'untied'}{'_uneven' if uneven else ''}{'_long' if long else ''}"
        (out / f"results_{name}_rank{RANK}.json").write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
# Twice in ~80 runs (once under a full test run) a rank aborted with "terminate called without an
# active exception"; a plain gloo + DTensor script here aborts the same way at interpreter exit (a
# runtime thread torn down unjoined). Leave without running the C++ static destructors.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)

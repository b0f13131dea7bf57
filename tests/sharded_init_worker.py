"""Runs under torchrun (2 ranks, gloo) for tests/test_sharded_init.py.

For each case (DoRA, PiSSA, PiSSA with a random sketch, OLoRA, GPT-2 Conv1D PiSSA, modules_to_save
on a tied head, an init_adapter with DoRA), a tiny model is written as a safetensors checkpoint and
brought up two ways in every rank:

- the oracle: transformers loads it whole, LoRA is injected (or the adapter loaded) as in one process;
- lorakit's sharded load: the base built on meta, LoRA injected on meta, ``init_meta_adapters``,
  ``wrap`` with the checkpoint (each rank reads its rows, then the deferred base-reading init
  gathers one module at a time), the init_adapter's values loaded into the shards.

Recorded: the largest difference of every parameter (adapters, residual bases, trained copies) and
of the loss after init and after 3 SGD steps on the same batch, whether the random state after
injection matches, the PiSSA/OLoRA starts kept for saving, and what the rank read and gathered.
Results go to results_<case>_rank<r>.json in --out.
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
parser.add_argument("--cases", default="")
ARGS = parser.parse_args()

dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=600))
RANK = dist.get_rank()

from transformers import AutoModelForCausalLM  # noqa: E402

from lorakit import LoraConfig, inject_lora, load_adapter, save_adapter  # noqa: E402
from lorakit.distributed import DistInfo, FsdpOptions, LossModule, full_tensor, wrap  # noqa: E402
from lorakit.distributed.sharded_load import (build_meta_model, checkpoint_index, init_meta_adapters,  # noqa: E402
                                              mismatched_keys)
from lorakit.lora import adapter_state_dict, lora_modules  # noqa: E402
from lorakit.lora.io import initial_adapter  # noqa: E402
from lorakit.lora.layer import ModulesToSave  # noqa: E402
from lorakit.training.loss import causal_lm_loss  # noqa: E402
from tests.models import randomize_lora, tiny_gpt2, tiny_qwen3  # noqa: E402

QWEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "dora": (tiny_qwen3, dict(target_modules=QWEN + ["embed_tokens"], use_dora=True)),
    "pissa": (tiny_qwen3, dict(target_modules=QWEN, init_lora_weights="pissa")),
    "pissa_niter": (tiny_qwen3, dict(target_modules=QWEN, init_lora_weights="pissa_niter_2")),
    "olora": (tiny_qwen3, dict(target_modules=QWEN, init_lora_weights="olora")),
    "gpt2_pissa": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc", "c_proj"], init_lora_weights="pissa")),
    "modules_to_save": (lambda seed: tiny_qwen3(seed, tie=True), dict(target_modules=["q_proj", "v_proj"],
                                                                      modules_to_save=["lm_head"])),
    "init_adapter": (tiny_qwen3, dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
}


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(5)  # the same batch on every rank: FSDP2's mean gradient is the oracle's
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _attach(model, lora: LoraConfig, adapter) -> None:
    torch.manual_seed(7)
    if adapter is None:
        inject_lora(model, lora)
    else:
        load_adapter(model, adapter, trainable=True)


def run(case: str, out: Path) -> dict:
    build, kwargs = CASES[case]
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, **kwargs)
    base_dir = out / f"base_{case}"
    adapter = None
    if RANK == 0:
        base = build(0)
        for dropout in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):  # GPT-2's: the two runs draw other masks
            if hasattr(base.config, dropout):
                setattr(base.config, dropout, 0.0)
        base.save_pretrained(base_dir)
        if case == "init_adapter":  # a trained-looking DoRA adapter, saved by one process
            inject_lora(base, lora)
            randomize_lora(base, seed=11, scale=0.2)
            save_adapter(base, out / "adapter_init")
    dist.barrier()
    if case == "init_adapter":
        adapter = out / "adapter_init"

    # The oracle: one process, the whole base.
    ref = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    _attach(ref, lora, adapter)
    rng_ref = torch.get_rng_state()

    # lorakit's sharded load.
    index = checkpoint_index(str(base_dir))
    model = build_meta_model(str(base_dir), torch.float32)
    assert mismatched_keys(model, index) == []
    _attach(model, lora, adapter)
    init_meta_adapters(model)
    same_rng = torch.equal(torch.get_rng_state(), rng_ref)
    fsdp = FsdpOptions(checkpoint=index)
    info = DistInfo(RANK, dist.get_world_size(), 0, "fsdp2")
    root = wrap(LossModule(model.train(), causal_lm_loss), info, torch.device("cpu"), torch.float32, fsdp)
    if adapter is not None:
        load_adapter(model, adapter, trainable=True)  # into the shards, as the recipes do after wrap

    sharded = sum(1 for p in model.parameters() if hasattr(p, "device_mesh"))
    base_weights = [m.base_layer.weight for _, m in lora_modules(ref) if hasattr(m, "base_layer")]
    copies = sum(p.numel() * p.element_size() for _, m in lora_modules(ref) if isinstance(m, ModulesToSave)
                 for p in m.modules_to_save.parameters())

    def differences() -> dict:
        # a frozen plain embedding looks up in its shards (distributed.vocab.ShardedEmbedding wraps it)
        mine = {n.replace(".embedding.", "."): p for n, p in model.named_parameters(remove_duplicate=False)}
        worst = {}
        for name, theirs in ref.named_parameters():
            whole = full_tensor(mine[name].detach())  # every rank gathers, in the same order
            worst[name] = (whole - theirs.detach()).abs().max().item()
        return worst

    def starts() -> float:
        a, b = initial_adapter(ref), initial_adapter(model)
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
        return max([(x - y).abs().max().item() for k in a for x, y in zip(a[k], b[k])], default=0.0)

    batch = _batch(ref.config.vocab_size)
    params_ref = [p for p in ref.parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    opt_ref, opt = torch.optim.SGD(params_ref, lr=0.1), torch.optim.SGD(params, lr=0.1)
    result = {"same_rng": same_rng, "sharded_params": sharded, "init": differences(), "starts": starts(),
              "trainable": [len(params_ref), len(params)], "losses": [],
              "read": fsdp.loaded.bytes_read, "checkpoint": index.nbytes, "copies": copies,
              "gathered": fsdp.loaded.gathered, "largest_gather": fsdp.loaded.largest_gather,
              "largest_module": max(w.numel() * w.element_size() for w in base_weights)}
    for _ in range(3):
        loss_sum, n = causal_lm_loss(ref.train(), batch)
        (loss_sum / n).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        mine_sum, mine_n = root(batch)
        (mine_sum / mine_n).backward()
        opt.step()
        opt.zero_grad()
        result["losses"].append([(loss_sum / n).item(), (mine_sum / mine_n).item()])
    result["trained"] = differences()
    result["adapter_keys"] = sorted(adapter_state_dict(model))
    return result


out = Path(ARGS.out)
for case in (ARGS.cases.split(",") if ARGS.cases else CASES):
    try:
        result = run(case, out)
    except Exception:  # the test prints it
        result = {"error": traceback.format_exc()}
    (out / f"results_{case}_rank{RANK}.json").write_text(json.dumps(result))
    dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # as tests/fsdp_units_worker.py: gloo + DTensor scripts can abort at interpreter exit

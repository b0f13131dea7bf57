"""Supervised fine-tuning with LoRA on chat / Alpaca / text JSONL.

Reads top to bottom: setup, data, adapter, optimizer, (resume), loop, save. Run it with
``lorakit train CONFIG.yaml`` or from Python with ``run(load_config("CONFIG.yaml"))``.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import RunConfig, dump_config
from ..data import IGNORE, Row, collate, collect_eos_ids, pad_token_id
from ..distributed import DistInfo, LossModule, all_reduce_sum, barrier, full_tensor, init_distributed, shutdown, wrap
from ..distributed.sharded_load import init_meta_adapters, load_report
from ..lora import (adapter_configs, adapter_state_dict, final_adapter, inject_lora, load_adapter, lora_modules, trainable_report,
                    write_adapter)
from ..models import resolve_device
from ..training import (
    start_run,
    build_optimizer,
    set_lr,
    check_same_run,
    MetricsWriter,
    Progress,
    causal_lm_loss,
    latest_checkpoint,
    load_checkpoint_adapter,
    load_checkpoint_state,
    lr_at,
    plot_loss,
    save_checkpoint,
    warmup_steps_for,
)
from ..training.rows import epoch_order
from ..training.setup import choose_padding_free
from ..training.rows import load_rows as read_rows
from ..training.rows import vocab_rows

ADAPTER = "default"


def run(cfg: RunConfig, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train a LoRA adapter as ``cfg`` says; return the directory of the final adapter.

    Under torchrun every rank runs this; rank 0 logs and writes files.
    """
    tc = cfg.train
    if not cfg.model:
        raise ValueError("config: 'model' is required (a local HF model directory)")
    if not cfg.data.train:
        raise ValueError("config: 'data.train' is required (a JSONL file)")

    # --- setup ----------------------------------------------------------------------------------
    device = resolve_device(tc.device)
    info = init_distributed(tc.distributed, device.type, tc.dist_timeout_s)
    try:
        adapter_dir = _run(cfg, resume, log, info, device)
        barrier(info)  # leave together: a rank tearing down its process group early can abort a peer
        return adapter_dir
    finally:
        shutdown(info)


def _run(cfg: RunConfig, resume: bool, log: Callable[[str], None], info, device: torch.device) -> Path:
    out = Path(cfg.output_dir)
    tc = cfg.train
    run = start_run(cfg, info, device, log, sharded_load=True)
    device, dtype, tokenizer, model, log = run.device, run.dtype, run.tokenizer, run.model, run.log

    # --- data -----------------------------------------------------------------------------------
    def load_rows(path: str, what: str) -> list[Row]:
        eos_ids = collect_eos_ids(tokenizer, model.generation_config)  # instruct models may list several
        return read_rows(path, cfg.data, tc, tokenizer, what, log, eos_ids, vocab_rows(model))

    train_rows = load_rows(cfg.data.train, "train")
    eval_rows = load_rows(cfg.data.eval, "eval") if cfg.data.eval else []
    pad = pad_token_id(tokenizer)

    # --- adapter --------------------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    if cfg.init_adapter:  # continue training an existing adapter: its own config rules
        load_adapter(model, cfg.init_adapter, adapter_name=ADAPTER, trainable=True)
        wrapped = [name for name, _ in lora_modules(model)]
        log(f"Starting from adapter {cfg.init_adapter} (its lora settings replace the config's)")
    else:
        lora_config = cfg.lora.to_lora_config(task_type="CAUSAL_LM", base_model_name_or_path=cfg.model)
        wrapped = inject_lora(model, lora_config, adapter_name=ADAPTER)
    if run.sharded_load:  # the base is on meta: the adapter gets its real start here, same draws as one process
        init_meta_adapters(model)
    log("=" * 72)
    log(f"Applying LoRA to {type(model).__name__} ({cfg.model})")
    for name in wrapped[:4]:
        log(f"  Applied LoRA to: {name}")
    if len(wrapped) > 4:
        log(f"  ... and {len(wrapped) - 4} more")
    log(str(trainable_report(model)))
    log("=" * 72)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    # --- resume (weights), wrap, optimizer, resume (state) ----------------------------------------
    state = {"step": 0, "epoch": 0, "sample": 0, "tokens": 0}
    resumed_from: Optional[Path] = latest_checkpoint(out) if resume else None
    if resume and resumed_from is None:
        log(f"--resume: no checkpoint in {out}; starting from scratch")
    if not resume and latest_checkpoint(out) is not None:
        raise ValueError(f"output_dir {out} already holds checkpoints of an earlier run; pass --resume to continue "
                         "it, or choose another output_dir (nothing was overwritten)")

    if resumed_from is not None:
        check_same_run(resumed_from, cfg, info.world, _RESUME_KEYS, global_batch=True)
        if not run.sharded_load:
            load_checkpoint_adapter(resumed_from, model, ADAPTER)  # before sharding: whole tensors go in
    step_module = wrap(LossModule(model, causal_lm_loss), info, device, dtype, run.fsdp)
    if run.sharded_load:
        # After the deferred init (DoRA, PiSSA/OLoRA) as a one-process run loads after its init:
        # each rank copies its own region of the saved tensors into its shards.
        if cfg.init_adapter:
            load_adapter(model, cfg.init_adapter, adapter_name=ADAPTER, trainable=True)
        if resumed_from is not None:
            load_checkpoint_adapter(resumed_from, model, ADAPTER)
        log(load_report(run.fsdp.loaded, run.fsdp.checkpoint))
    padding_free = choose_padding_free(run, cfg, step_module, info)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.loraplus_lr_ratio)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    global_batch = tc.batch_size * info.world  # samples per micro-batch over all ranks
    batches_per_epoch = math.ceil(len(train_rows) / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.grad_accum)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    warmup = warmup_steps_for(total_steps, tc.warmup_ratio)
    log(f"Training: {total_steps} steps ({steps_per_epoch}/epoch), global batch {global_batch * tc.grad_accum} = "
        f"batch {tc.batch_size} x {info.world} rank(s) x grad_accum {tc.grad_accum}, lr {tc.lr:g} {tc.lr_scheduler} "
        f"(warm-up {warmup}), {dtype} on {device}" + (f", {info.mode}" if info.mode != "none" else ""))
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if resumed_from is not None:
        state.update(load_checkpoint_state(resumed_from, model, optimizer, info, tc.seed, scaler))
        if state["step"] > total_steps:
            raise ValueError(f"{resumed_from} is at step {state['step']}, past this run's {total_steps} steps; "
                             "raise train.max_steps to continue it")
        log(f"Resumed from {resumed_from} (step {state['step']}, epoch {state['epoch']}, sample {state['sample']})")
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=state["step"] if resumed_from else None,
                            tensorboard_dir=out / "tb" if tc.tensorboard else None) if info.main else None

    def autocast():
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def micro_batch(rows: list[Row]) -> dict[str, torch.Tensor]:
        return rank_micro_batch(rows, info, pad, tc.packing, padding_free, device)

    def evaluate() -> float:
        step_module.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for i in range(0, len(eval_rows), global_batch):
                with autocast():
                    loss_sum, n = step_module(micro_batch(eval_rows[i:i + global_batch]))
                total, count = total + loss_sum.item(), count + n.item()
        step_module.train()
        return all_reduce_sum(total, info, device) / max(all_reduce_sum(count, info, device), 1.0)

    def checkpoint() -> Path:
        return save_checkpoint(out, state["step"], model, optimizer, dict(state), info, ADAPTER,
                               config_yaml=dump_config(cfg), total_limit=tc.save_total_limit, scaler=scaler)

    def log_metrics(record: dict) -> None:
        if metrics is not None:
            metrics.log(record)

    # --- loop -----------------------------------------------------------------------------------
    step_module.train()
    progress = Progress(total_steps, initial=state["step"]) if info.main else None
    last_saved = state["step"] if resumed_from else -1
    window_tokens, window_start, tokens_per_s = 0, time.perf_counter(), 0.0
    loop_start, steps_before, tokens_before = time.perf_counter(), state["step"], state["tokens"]
    while state["step"] < total_steps:
        # The epoch's order is a function of (seed, epoch) alone: a resumed run sees the same batches,
        # whatever the world size; each global micro-batch is split across the ranks.
        order = epoch_order(len(train_rows), tc.seed, state["epoch"])
        while state["sample"] < len(order) and state["step"] < total_steps:
            window = []
            for k in range(tc.grad_accum):
                start = state["sample"] + k * global_batch
                if start < len(order):
                    window.append(micro_batch([train_rows[j] for j in order[start:start + global_batch]]))
            # Normalise by the labelled tokens of the whole window on all ranks: each token weighs the
            # same. DDP and FSDP2 average gradients over ranks, hence the factor world.
            n_window = all_reduce_sum(sum(float((b["labels"][:, 1:] != IGNORE).sum()) for b in window), info, device)
            loss_local = 0.0
            for k, batch in enumerate(window):
                last = k == len(window) - 1
                if info.mode == "fsdp2":
                    step_module.set_requires_gradient_sync(last)
                sync = step_module.no_sync() if info.mode == "ddp" and not last else nullcontext()
                with sync:
                    with autocast():
                        loss_sum, _ = step_module(batch)
                    loss = loss_sum * info.world / n_window
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_local += loss_sum.item()
            loss_total = all_reduce_sum(loss_local, info, device) / n_window
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
            lr = lr_at(state["step"], total_steps, tc.lr, warmup, tc.lr_scheduler)
            set_lr(optimizer, lr)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens = int(all_reduce_sum(sum(float(b["num_tokens"]) for b in window), info, device))
            state["sample"] = min(len(order), state["sample"] + tc.grad_accum * global_batch)
            state["step"] += 1
            state["tokens"] += tokens

            step = state["step"]
            window_tokens += tokens
            if step % tc.logging_steps == 0 or step == total_steps:
                tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                log_metrics({"step": step, "epoch": state["epoch"], "loss": loss_total, "lr": lr,
                             "grad_norm": float(full_tensor(grad_norm)),  # a DTensor under FSDP2
                             "tokens": state["tokens"], "tokens_per_s": tokens_per_s})
                window_tokens, window_start = 0, time.perf_counter()
            if progress is not None:
                progress.update(step, loss=loss_total, lr=lr, tok_s=round(tokens_per_s))
            if eval_rows and tc.eval_steps and step % tc.eval_steps == 0:
                log_metrics({"step": step, "eval_loss": evaluate()})
                window_start = time.perf_counter()
            if tc.save_steps and step % tc.save_steps == 0:
                checkpoint()
                last_saved = step
                window_start = time.perf_counter()
        if state["sample"] >= len(order):
            state["epoch"] += 1
            state["sample"] = 0
    if progress is not None:
        progress.close()
    runtime = time.perf_counter() - loop_start
    run_tokens = state["tokens"] - tokens_before
    log_metrics({"step": state["step"], "train_runtime": runtime, "train_tokens": run_tokens})
    log(f"Trained {state['step'] - steps_before} steps in {runtime:.1f}s: {run_tokens:,} tokens, "
        f"{run_tokens / max(runtime, 1e-9):,.0f} tokens/s")

    # --- save -----------------------------------------------------------------------------------
    if eval_rows:
        eval_loss = evaluate()
        log_metrics({"step": state["step"], "eval_loss": eval_loss})
        log(f"Eval loss: {eval_loss:.4f}")
    if last_saved != state["step"]:
        checkpoint()
    adapter_dir = out / "adapter"
    final_config, tensors = final_adapter(model, ADAPTER)  # every rank joins the gather; rank 0 writes
    if info.main:
        metrics.close()
        write_adapter(adapter_dir, final_config, tensors)
        if plot_loss(out / "metrics.jsonl", out / "loss.png"):
            log(f"Loss curve: {out / 'loss.png'}")
    log(f"Adapter saved to {adapter_dir}")
    return adapter_dir


def rank_micro_batch(rows: list[Row], info: DistInfo, pad_id: int, packed: bool, padding_free: bool,
                     device: torch.device = torch.device("cpu")) -> dict[str, torch.Tensor]:
    """This rank's share of a global micro-batch, collated: rows ``rank, rank + world, ...``.

    A rank left with no row (fewer rows than ranks) gets a copy of the first row with no labels: it
    adds nothing to the loss, and keeps the rank in step with the others' collectives.
    """
    mine = rows[info.rank::info.world]
    if not mine:
        mine = [Row(rows[0].input_ids, [IGNORE] * len(rows[0].labels), rows[0].position_ids)]
    return {k: v.to(device) for k, v in collate(mine, pad_id, packed, padding_free).items()}


# What must not change between a run and its resumption (the data order and the adapter's math).
_RESUME_KEYS = ("data.train", "data.format", "data.system_prompt", "train.seed", "train.max_seq_len", "train.packing",
                "train.grad_accum", "train.loraplus_lr_ratio", "quantization", "lora.use_dora", "lora.init_lora_weights", "lora.r", "lora.alpha", "lora.target_modules", "lora.use_rslora", "init_adapter")

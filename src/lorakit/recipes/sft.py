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
from ..data import IGNORE, Row, collate, encode_all, pad_token_id, read_jsonl, to_rows
from ..lora import inject_lora, save_adapter, trainable_report
from ..models import load_model, load_tokenizer, resolve_device, resolve_dtype, write_demo_model
from ..training import (
    MetricsWriter,
    Progress,
    causal_lm_loss,
    latest_checkpoint,
    packed_attention_is_isolated,
    load_checkpoint,
    lr_at,
    plot_loss,
    save_checkpoint,
    warmup_steps_for,
)

ADAPTER = "default"


def run(cfg: RunConfig, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train a LoRA adapter as ``cfg`` says; return the directory of the final adapter."""
    out = Path(cfg.output_dir)
    tc = cfg.train
    if not cfg.model:
        raise ValueError("config: 'model' is required (a local HF model directory)")
    if not cfg.data.train:
        raise ValueError("config: 'data.train' is required (a JSONL file)")

    # --- setup ----------------------------------------------------------------------------------
    device = resolve_device(tc.device)
    dtype = resolve_dtype(tc.dtype, device)
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("train.dtype=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if cfg.create_demo_model and not Path(cfg.model).exists():
        write_demo_model(cfg.model)
        log(f"Created the demo model in {cfg.model}")
    tokenizer = load_tokenizer(cfg.model)
    # On GPU the frozen base is stored in the compute dtype; on CPU it stays fp32 under autocast.
    model = load_model(cfg.model, dtype=dtype if device.type == "cuda" else torch.float32, device=device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")

    # --- data -----------------------------------------------------------------------------------
    def load_rows(path: str, what: str) -> list[Row]:
        samples, skipped = read_jsonl(path, cfg.data.format, cfg.data.skip_invalid, cfg.data.system_prompt)
        encoded, dropped = encode_all(tokenizer, samples, tc.max_seq_len)
        if not encoded:
            raise ValueError(f"{path}: no sample has a labelled token left within train.max_seq_len={tc.max_seq_len}")
        rows = to_rows(encoded, tc.max_seq_len, tc.packing)
        tokens = sum(len(e.input_ids) for e in encoded)
        labels = sum(e.num_labels for e in encoded)
        log(f"{what} data: {path}: {len(encoded)} samples ({skipped} invalid lines skipped, {dropped} with no "
            f"label left after truncation), {tokens:,} tokens, {labels:,} labelled, {len(rows)} rows"
            + (" (packed)" if tc.packing else ""))
        return rows

    train_rows = load_rows(cfg.data.train, "train")
    eval_rows = load_rows(cfg.data.eval, "eval") if cfg.data.eval else []
    pad = pad_token_id(tokenizer)

    # --- adapter --------------------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    lora_config = cfg.lora.to_lora_config(task_type="CAUSAL_LM", base_model_name_or_path=cfg.model)
    wrapped = inject_lora(model, lora_config, adapter_name=ADAPTER)
    log("=" * 72)
    log(f"Applying LoRA to {type(model).__name__} ({cfg.model})")
    for name in wrapped[:4]:
        log(f"  Applied LoRA to: {name}")
    if len(wrapped) > 4:
        log(f"  ... and {len(wrapped) - 4} more")
    log(str(trainable_report(model)))
    log("=" * 72)
    padding_free = tc.padding_free
    if (tc.packing or padding_free) and not packed_attention_is_isolated(model):
        if tc.packing:
            raise ValueError(f"train.packing: {type(model).__name__}'s attention does not keep packed samples apart "
                             "(it ignores restarting position_ids); set train.packing=false")
        log("Note: this model's attention cannot isolate packed samples; padding batches instead")
        padding_free = False
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    # --- optimizer and schedule -----------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    batches_per_epoch = math.ceil(len(train_rows) / tc.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.grad_accum)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    warmup = warmup_steps_for(total_steps, tc.warmup_ratio)
    log(f"Training: {total_steps} steps ({steps_per_epoch}/epoch), batch {tc.batch_size} x grad_accum "
        f"{tc.grad_accum}, lr {tc.lr:g} {tc.lr_scheduler} (warm-up {warmup}), {dtype} on {device}")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    # --- resume ---------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0}
    resumed_from: Optional[Path] = latest_checkpoint(out) if resume else None
    if resume and resumed_from is None:
        log(f"--resume: no checkpoint in {out}; starting from scratch")
    if resumed_from is not None:
        state.update(load_checkpoint(resumed_from, model, optimizer, ADAPTER))
        log(f"Resumed from {resumed_from} (step {state['step']}, epoch {state['epoch']}, batch {state['batch']})")
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=state["step"] if resumed_from else None,
                            tensorboard_dir=out / "tb" if tc.tensorboard else None)

    def autocast():
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batch.items()}

    def evaluate() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(eval_rows), tc.batch_size):
                batch = to_device(collate(eval_rows[i:i + tc.batch_size], pad, tc.packing, padding_free))
                with autocast():
                    loss_sum, n = causal_lm_loss(model, batch)
                total, count = total + loss_sum.item(), count + n
        model.train()
        return total / max(count, 1)

    def checkpoint() -> Path:
        return save_checkpoint(out, state["step"], model, optimizer, dict(state), ADAPTER,
                               config_yaml=dump_config(cfg), total_limit=tc.save_total_limit)

    # --- loop -----------------------------------------------------------------------------------
    model.train()
    progress = Progress(total_steps, initial=state["step"])
    last_saved = state["step"] if resumed_from else -1
    window_tokens, window_start, tokens_per_s = 0, time.perf_counter(), 0.0
    loop_start, steps_before, tokens_before = time.perf_counter(), state["step"], state["tokens"]
    while state["step"] < total_steps:
        # The epoch's order is a function of (seed, epoch) alone: a resumed run sees the same batches.
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(tc.seed + state["epoch"]))
        batches = [order[i:i + tc.batch_size].tolist() for i in range(0, len(train_rows), tc.batch_size)]
        while state["batch"] < len(batches) and state["step"] < total_steps:
            window = [to_device(collate([train_rows[j] for j in idx], pad, tc.packing, padding_free))
                      for idx in batches[state["batch"]:state["batch"] + tc.grad_accum]]
            # Normalise by the labelled tokens of the whole window: each token weighs the same.
            n_window = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in window)
            loss_total = 0.0
            for batch in window:
                with autocast():
                    loss_sum, _ = causal_lm_loss(model, batch)
                loss = loss_sum / n_window
                (scaler.scale(loss) if scaler else loss).backward()
                loss_total += loss.item()
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
            lr = lr_at(state["step"], total_steps, tc.lr, warmup, tc.lr_scheduler)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens = sum(int(b["num_tokens"]) for b in window)
            state["batch"] += len(window)
            state["step"] += 1
            state["tokens"] += tokens

            step = state["step"]
            window_tokens += tokens
            if step % tc.logging_steps == 0 or step == total_steps:
                tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                metrics.log({"step": step, "epoch": state["epoch"], "loss": loss_total, "lr": lr,
                             "grad_norm": float(grad_norm), "tokens": state["tokens"], "tokens_per_s": tokens_per_s})
                window_tokens, window_start = 0, time.perf_counter()
            progress.update(step, loss=loss_total, lr=lr, tok_s=round(tokens_per_s))
            if eval_rows and tc.eval_steps and step % tc.eval_steps == 0:
                metrics.log({"step": step, "eval_loss": evaluate()})
                window_start = time.perf_counter()
            if tc.save_steps and step % tc.save_steps == 0:
                checkpoint()
                last_saved = step
                window_start = time.perf_counter()
        if state["batch"] >= len(batches):
            state["epoch"] += 1
            state["batch"] = 0
    progress.close()
    runtime = time.perf_counter() - loop_start
    run_tokens = state["tokens"] - tokens_before
    metrics.log({"step": state["step"], "train_runtime": runtime, "train_tokens": run_tokens})
    log(f"Trained {state['step'] - steps_before} steps in {runtime:.1f}s: {run_tokens:,} tokens, "
        f"{run_tokens / max(runtime, 1e-9):,.0f} tokens/s")

    # --- save -----------------------------------------------------------------------------------
    if eval_rows:
        eval_loss = evaluate()
        metrics.log({"step": state["step"], "eval_loss": eval_loss})
        log(f"Eval loss: {eval_loss:.4f}")
    if last_saved != state["step"]:
        checkpoint()
    metrics.close()
    adapter_dir = out / "adapter"
    save_adapter(model, adapter_dir, adapter_name=ADAPTER)
    if plot_loss(out / "metrics.jsonl", out / "loss.png"):
        log(f"Loss curve: {out / 'loss.png'}")
    log(f"Adapter saved to {adapter_dir}")
    return adapter_dir

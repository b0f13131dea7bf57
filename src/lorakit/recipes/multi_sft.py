"""Several SFT adapters trained at once on one copy of the base (a run config with ``jobs:``).

Reads top to bottom: setup, data (every job's, checked before anything trains), adapters (one per
job, under the job's name), resume, wrap, optimizers, loop, save. Each micro-batch holds the next
micro-batch of every unfinished job; each row is routed to its job's adapter, so gradients reach
only that adapter. The loss is ``sum over jobs of loss_sum(job) / labelled_tokens(job's window)``:
each adapter gets exactly the gradient it would get in a run of its own. Each job keeps its own
optimizer, schedule, data order, metrics, checkpoints and final adapter in ``output_dir/<job>/``,
and when it reaches its last step its adapter is saved and its rows stop being scheduled.

Run it with ``lorakit train JOBS.yaml`` (any config with ``jobs:``), or ``run(load_config(...))``.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..config import RunConfig, dump_config, job_run_config
from ..data import Row, collect_eos_ids, pad_token_id
from ..distributed import all_reduce_sum, barrier, full_tensor, init_distributed, shutdown, wrap
from ..lora import (adapter_configs, adapter_state_dict, inject_lora, load_adapter, route_adapters, trainable_report,
                    write_adapter)
from ..models import resolve_device
from ..training import (
    MetricsWriter,
    Progress,
    causal_lm_loss_by_group,
    check_same_run,
    latest_checkpoint,
    load_checkpoint_adapter,
    load_checkpoint_state,
    lr_at,
    packed_attention_is_isolated,
    plot_loss,
    save_checkpoint,
    start_run,
    warmup_steps_for,
)
from ..training.jobs import adapter_parameters, advance, labelled_tokens, mixed_batch, next_window, train_only
from ..training.rows import load_rows, vocab_rows
from ..training.setup import use_packed_sdpa
from .sft import _RESUME_KEYS


def run(cfg: RunConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Train every job of ``cfg.jobs`` together; return each job's final adapter directory by name.

    Under torchrun every rank runs this; rank 0 logs and writes files.
    """
    if not cfg.jobs:
        raise ValueError("config: 'jobs' is empty; a run with one adapter uses the sft recipe")
    if not cfg.model:
        raise ValueError("config: 'model' is required (a local HF model directory)")
    if cfg.recipe != "sft":
        raise ValueError(f"config: recipe {cfg.recipe!r} with 'jobs': only sft jobs can share a run so far")
    for job in cfg.jobs:
        if not job.data.train:
            raise ValueError(f"config: job '{job.name}': 'data.train' is required (a JSONL file)")
    device = resolve_device(cfg.train.device)
    info = init_distributed(cfg.train.distributed, device.type, cfg.train.dist_timeout_s)
    try:
        adapters = _run(cfg, resume, log, info, device)
        barrier(info)  # leave together: a rank tearing down its process group early can abort a peer
        return adapters
    finally:
        shutdown(info)


@dataclass
class Job:
    """One job's state in a multi-job run: its settings and data, optimizer, place in its data,
    the accumulation window in progress, metrics and checkpoints."""

    name: str
    cfg: RunConfig
    """The single-run config equivalent to this job (what its checkpoints record)."""
    rows: list[Row]
    eval_rows: list[Row]
    out: Path
    total_steps: int = 0
    warmup: int = 0
    global_batch: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {"step": 0, "epoch": 0, "sample": 0, "tokens": 0})
    resumed_from: Optional[Path] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    params: list[nn.Parameter] = field(default_factory=list)
    metrics: Optional[MetricsWriter] = None
    last_saved: int = -1
    window: Optional[list[list[Row]]] = None
    """The global micro-batches of the optimizer step in progress (None between steps)."""
    position: int = 0
    """How many micro-batches of ``window`` went through backward."""
    window_labels: float = 0.0
    """Labelled tokens of the whole window over all ranks: this job's loss normaliser."""
    window_loss: float = 0.0
    window_tokens: int = 0
    tokens_since_log: int = 0
    log_start: float = 0.0
    tokens_per_s: float = 0.0
    steps_before: int = 0
    tokens_before: int = 0
    done: bool = False

    @property
    def train(self):
        return self.cfg.train

    def log_metrics(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(record)


def _run(cfg: RunConfig, resume: bool, log: Callable[[str], None], info, device: torch.device) -> dict[str, Path]:
    tc = cfg.train  # the shared settings: dtype, device, distributed, padding_free, gradient_checkpointing
    if tc.dtype == "fp16":
        raise ValueError("train.dtype=fp16 is not supported with 'jobs' (one loss scale cannot serve optimizers "
                         "that step at different times); use bf16 or fp32")
    out = Path(cfg.output_dir)
    start = start_run(cfg, info, device, log)  # one base, loaded once for every job
    device, dtype, tokenizer, model, log = start.device, start.dtype, start.tokenizer, start.model, start.log
    pad = pad_token_id(tokenizer)
    eos_ids = collect_eos_ids(tokenizer, model.generation_config)  # instruct models may list several
    vocab = vocab_rows(model)

    # --- data: every job's, checked before anything trains ------------------------------------------
    jobs: list[Job] = []
    for spec in cfg.jobs:
        job_cfg = job_run_config(cfg, spec)
        try:
            rows = load_rows(job_cfg.data.train, job_cfg.data, job_cfg.train, tokenizer, f"[{spec.name}] train", log, eos_ids,
                             vocab)
            evals = (load_rows(job_cfg.data.eval, job_cfg.data, job_cfg.train, tokenizer, f"[{spec.name}] eval", log, eos_ids,
                                vocab)
                     if job_cfg.data.eval else [])
        except ValueError as err:
            raise ValueError(f"job '{spec.name}': {err}") from None
        jobs.append(Job(spec.name, job_cfg, rows, evals, out / spec.name))

    # --- adapters: one per job, under the job's name --------------------------------------------------
    log("=" * 72)
    log(f"Applying {len(jobs)} LoRA adapters to {type(model).__name__} ({cfg.model})")
    for job in jobs:
        torch.manual_seed(job.train.seed)  # the same init as the job alone: seed, then inject
        if job.cfg.init_adapter:
            load_adapter(model, job.cfg.init_adapter, adapter_name=job.name, trainable=True)
            log(f"  [{job.name}] starting from adapter {job.cfg.init_adapter} (its lora settings replace the config's)")
        else:
            lora_config = job.cfg.lora.to_lora_config(task_type="CAUSAL_LM", base_model_name_or_path=cfg.model)
            wrapped = inject_lora(model, lora_config, adapter_name=job.name)
            log(f"  [{job.name}] r={lora_config.r} on {len(wrapped)} modules, e.g. {wrapped[0]}")
    train_only(model, [job.name for job in jobs])
    log(str(trainable_report(model)))
    log("=" * 72)
    if tc.padding_free and start.attention.implementation == "sdpa":
        # Jobs' rows go end to end in one row: plain sdpa would keep the samples apart with a dense
        # (T, T) mask over the whole row, quadratic in all jobs' tokens together; this runs sdpa on
        # each sample alone (the samples' lengths squared, no padding). The check below runs on it.
        if use_packed_sdpa(model):
            log("Attention: sdpa one packed sample at a time (no dense mask over the jobs' row)")
    isolated = packed_attention_is_isolated(model)
    for job in jobs:
        if job.train.packing and not isolated:
            raise ValueError(f"job '{job.name}': train.packing: {type(model).__name__}'s attention does not keep packed "
                             "samples apart (it ignores restarting position_ids); set train.packing=false")
    if tc.padding_free and not isolated:
        log("Note: this model's attention cannot isolate packed samples; padding batches instead")
    concat = tc.padding_free and isolated  # each job's rows of a micro-batch end to end
    # All jobs' rows in one batch row, each token routed to its job's adapter: no padding at all.
    # Trained copies of whole modules (modules_to_save) route by batch row, so they keep one row per job.
    one_row = concat and not any(adapter_configs(model)[job.name].modules_to_save for job in jobs)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    # --- resume (weights), wrap, optimizers, resume (state) --------------------------------------------
    for job in jobs:
        found = latest_checkpoint(job.out)
        if found is not None and not resume:
            raise ValueError(f"job '{job.name}': {job.out} already holds checkpoints of an earlier run; pass --resume to "
                             "continue it, or choose another output_dir (nothing was overwritten)")
        job.resumed_from = found if resume else None
        if job.resumed_from is not None:
            check_same_run(job.resumed_from, job.cfg, info.world, _RESUME_KEYS, global_batch=True)
            load_checkpoint_adapter(job.resumed_from, model, job.name)  # before sharding: whole tensors go in
    if resume and all(job.resumed_from is None for job in jobs):
        log(f"--resume: no checkpoint in {out}/<job>; starting from scratch")
    train_only(model, [job.name for job in jobs])  # loading an adapter leaves only that one trainable
    step_module = wrap(_JobsLoss(model, len(jobs)), info, device, dtype, start.fsdp)
    for job in jobs:
        t = job.train
        job.params = adapter_parameters(model, job.name)  # after wrapping: FSDP2's sharded parameters
        job.optimizer = torch.optim.AdamW(job.params, lr=t.lr, weight_decay=t.weight_decay)
        job.global_batch = t.batch_size * info.world
        steps_per_epoch = math.ceil(math.ceil(len(job.rows) / job.global_batch) / t.grad_accum)
        job.total_steps = t.max_steps or t.epochs * steps_per_epoch
        job.warmup = warmup_steps_for(job.total_steps, t.warmup_ratio)
        if job.resumed_from is not None:
            job.state.update(load_checkpoint_state(job.resumed_from, model, job.optimizer, info, t.seed))
            if job.state["step"] > job.total_steps:
                raise ValueError(f"job '{job.name}': {job.resumed_from} is at step {job.state['step']}, past this job's "
                                 f"{job.total_steps} steps; raise its train.max_steps to continue it")
            job.last_saved = job.state["step"]
            log(f"[{job.name}] resumed from {job.resumed_from} (step {job.state['step']}, epoch {job.state['epoch']}, "
                f"sample {job.state['sample']})")
        job.steps_before, job.tokens_before = job.state["step"], job.state["tokens"]
        if job.state["step"] >= job.total_steps and (job.out / "adapter" / "adapter_model.safetensors").is_file():
            job.done = True  # finished before the kill: nothing to redo, nothing rewritten
            log(f"[{job.name}] finished earlier: {job.out / 'adapter'}")
            continue
        if info.main:
            job.out.mkdir(parents=True, exist_ok=True)
            (job.out / "config.yaml").write_text(dump_config(job.cfg), encoding="utf-8")
            job.metrics = MetricsWriter(job.out / "metrics.jsonl",
                                        resume_step=job.state["step"] if job.resumed_from else None,
                                        tensorboard_dir=job.out / "tb" if tc.tensorboard else None)
        log(f"[{job.name}] {job.total_steps} steps ({steps_per_epoch}/epoch), global batch "
            f"{job.global_batch * t.grad_accum} = batch {t.batch_size} x {info.world} rank(s) x grad_accum "
            f"{t.grad_accum}, lr {t.lr:g} {t.lr_scheduler} (warm-up {job.warmup})")
    log(f"Training {len(jobs)} jobs together, {dtype} on {device}" + (f", {info.mode}" if info.mode != "none" else ""))

    def autocast():
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def forward_backward(groups: list[list[Row]], weights: list[float], sync: bool,
                         backward: bool = True) -> tuple[list[float], int]:
        """One shared micro-batch: ``groups[i]`` are job i's rows on this rank, ``weights[i]`` the
        factor on its summed loss. Returns each job's summed loss on this rank, and the real tokens."""
        # Under torchrun every rank must reach the same adapters in every pass (their gradient
        # collectives must match), so a job with no row here gets one unlabelled token.
        batch = mixed_batch(groups, pad, packed=isolated, concat=concat, fill_empty=info.world > 1, one_row=one_row)
        names = [jobs[g].name for g in batch["row_group"].flatten().tolist()]  # per row, or per token
        batch = {k: v.to(device) for k, v in batch.items()}
        if info.mode == "fsdp2":
            step_module.set_requires_gradient_sync(sync)
        # Syncing any micro-batch is correct (ranks average what each has accumulated so far), so
        # DDP and FSDP2 skip it except where some job's window ends.
        no_sync = step_module.no_sync() if info.mode == "ddp" and not sync else nullcontext()
        # The routes stay on through backward: gradient checkpointing re-runs the forward there.
        with route_adapters(model, names), no_sync:
            with autocast():
                loss_sums, _ = step_module(batch)
            if backward:
                (loss_sums * torch.tensor(weights, device=loss_sums.device)).sum().backward()
        return loss_sums.tolist(), int(batch["num_tokens"])

    def evaluate(job: Job) -> float:
        step_module.eval()
        index = jobs.index(job)
        total, count = 0.0, 0.0
        with torch.no_grad():
            for i in range(0, len(job.eval_rows), job.global_batch):
                rows = job.eval_rows[i:i + job.global_batch][info.rank::info.world]
                groups = [rows if k == index else [] for k in range(len(jobs))]
                sums, _ = forward_backward(groups, [0.0] * len(jobs), sync=False, backward=False)
                total += sums[index]
                count += labelled_tokens(rows, concat)
        step_module.train()
        return all_reduce_sum(total, info, device) / max(all_reduce_sum(count, info, device), 1.0)

    def checkpoint(job: Job) -> None:
        save_checkpoint(job.out, job.state["step"], model, job.optimizer, dict(job.state), info, job.name,
                        config_yaml=dump_config(job.cfg), total_limit=job.train.save_total_limit)
        job.last_saved = job.state["step"]

    def finish(job: Job, runtime: float) -> Path:
        """The job's last step is done: final eval, checkpoint and adapter; its rows leave the batches."""
        job.done = True
        run_tokens = job.state["tokens"] - job.tokens_before
        job.log_metrics({"step": job.state["step"], "train_runtime": runtime, "train_tokens": run_tokens})
        log(f"[{job.name}] trained {job.state['step'] - job.steps_before} steps in {runtime:.1f}s: {run_tokens:,} tokens")
        if job.eval_rows:
            eval_loss = evaluate(job)
            job.log_metrics({"step": job.state["step"], "eval_loss": eval_loss})
            log(f"[{job.name}] eval loss: {eval_loss:.4f}")
        if job.last_saved != job.state["step"]:
            checkpoint(job)
        adapter_dir = job.out / "adapter"
        tensors = adapter_state_dict(model, job.name)  # every rank joins the gather; rank 0 writes
        if info.main:
            job.metrics.close()
            write_adapter(adapter_dir, adapter_configs(model)[job.name], tensors)
            if plot_loss(job.out / "metrics.jsonl", job.out / "loss.png"):
                log(f"[{job.name}] loss curve: {job.out / 'loss.png'}")
        log(f"[{job.name}] adapter saved to {adapter_dir}")
        return adapter_dir

    def optimizer_step(job: Job) -> None:
        t = job.train
        loss = all_reduce_sum(job.window_loss, info, device) / job.window_labels
        clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(job.params, clip)  # this job's gradient alone
        lr = lr_at(job.state["step"], job.total_steps, t.lr, job.warmup, t.lr_scheduler)
        for group in job.optimizer.param_groups:
            group["lr"] = lr
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        tokens = int(all_reduce_sum(job.window_tokens, info, device))
        advance(job.state, len(job.rows), job.global_batch, t.grad_accum)
        job.state["tokens"] += tokens
        job.window = None
        step = job.state["step"]
        job.tokens_since_log += tokens
        if step % t.logging_steps == 0 or step == job.total_steps:
            job.tokens_per_s = job.tokens_since_log / max(time.perf_counter() - job.log_start, 1e-9)
            job.log_metrics({"step": step, "epoch": job.state["epoch"], "loss": loss, "lr": lr,
                             "grad_norm": float(full_tensor(grad_norm)), "tokens": job.state["tokens"],
                             "tokens_per_s": job.tokens_per_s})
            job.tokens_since_log, job.log_start = 0, time.perf_counter()
        if job.eval_rows and t.eval_steps and step % t.eval_steps == 0:
            job.log_metrics({"step": step, "eval_loss": evaluate(job)})
        if t.save_steps and step % t.save_steps == 0:
            checkpoint(job)

    # --- loop -------------------------------------------------------------------------------------------
    step_module.train()
    adapters: dict[str, Path] = {}
    loop_start = time.perf_counter()
    saving = 0.0  # in finish(): final evals, checkpoints and adapters (a run of one job times them apart too)
    for job in jobs:
        job.log_start = loop_start
        if job.done:
            adapters[job.name] = job.out / "adapter"
        elif job.state["step"] >= job.total_steps:  # killed after its last checkpoint, before its adapter
            adapters[job.name] = finish(job, 0.0)
    progress = (Progress(sum(j.total_steps for j in jobs), initial=sum(j.state["step"] for j in jobs), desc="jobs")
                if info.main else None)
    while not all(job.done for job in jobs):
        live = [job for job in jobs if not job.done]
        for job in live:
            if job.window is None:  # a new optimizer step: its labelled tokens over all ranks normalise it
                job.window = next_window(job.rows, job.state, job.train.seed, job.global_batch, job.train.grad_accum)
                job.position, job.window_loss, job.window_tokens = 0, 0.0, 0
                mine = sum(labelled_tokens(rows[info.rank::info.world], concat) for rows in job.window)
                job.window_labels = max(all_reduce_sum(mine, info, device), 1.0)
        groups = [job.window[job.position][info.rank::info.world] if not job.done else [] for job in jobs]
        # DDP and FSDP2 average gradients over ranks, hence the factor world.
        weights = [info.world / job.window_labels if not job.done else 0.0 for job in jobs]
        ending = [job for job in live if job.position == len(job.window) - 1]
        sums, tokens = forward_backward(groups, weights, sync=bool(ending))
        for index, job in enumerate(jobs):
            if not job.done:
                job.window_loss += sums[index]
                job.window_tokens += sum(len(r.input_ids) for r in groups[index])
                job.position += 1
        for job in ending:
            optimizer_step(job)
            if job.state["step"] >= job.total_steps:
                finish_start = time.perf_counter()
                adapters[job.name] = finish(job, finish_start - loop_start - saving)
                saving += time.perf_counter() - finish_start
        if progress is not None:
            progress.update(sum(j.state["step"] for j in jobs), jobs_left=sum(not j.done for j in jobs))
    if progress is not None:
        progress.close()
    log(f"Trained {len(jobs)} jobs in {time.perf_counter() - loop_start - saving:.1f}s "
        f"(+{saving:.1f}s for finished jobs' final evals, checkpoints and adapters)")
    return adapters


class _JobsLoss(nn.Module):
    """The model plus the per-job loss in one forward, so DDP and FSDP2 see the step through their root."""

    def __init__(self, model: nn.Module, num_jobs: int) -> None:
        super().__init__()
        self.model = model
        self.num_jobs = num_jobs

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "num_tokens"}
        return causal_lm_loss_by_group(self.model, inputs, batch["row_group"], self.num_jobs)

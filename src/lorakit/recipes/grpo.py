"""GRPO with LoRA on verifiable rewards (RLVR).

The policy is base + LoRA; the reference is the same base with the adapter disabled (or a frozen
copy of ``init_adapter``): no second model. Rollouts come from lorakit's generation engine in this process, an
OpenAI-compatible server, or vLLM in this process, all behind one ``PolicySampler``; the server and
vLLM receive only adapter weights after each update. Every rollout batch names the policy version
that sampled it, and a stale rollout backend is an error (``rollout.check_sync``). With ``rollout.async``
the next step's groups are sampled while this step trains (one step off-policy).

Reads top to bottom: setup, prompts and rewards, adapter, rollout backend, optimizer, (resume), loop
(sample, score, advantages, old/reference log-probs, clipped updates, log, evaluate, checkpoint),
save. Run it with ``lorakit train CONFIG.yaml`` (``recipe: grpo``) or ``run(load_config(...))``.

The stateful pieces are named objects from ``lorakit.rl``, each unit-tested on its own:
``PolicySampler`` (the rollout backend, synced once per step), ``reference_policy``,
``CompletionBatches`` (prompt + completion micro-batches), ``GRPOObjective`` (the loss forward and
its statistics) and ``HeldOutEval``; the config-reading glue is below the recipe (``load_prompts``,
``attach_adapters``, ``rollout_backend``, ``sampling_seed``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

from ..config import RunConfig, dump_config
from ..data import PromptRecord, check_vocab, collect_eos_ids, pad_token_id, read_prompts, render_chat
from ..distributed import (DistInfo, LossModule, all_reduce_sum, any_rank, barrier, full_tensor, gather_objects_to_main,
                           init_distributed, like_param, shutdown, through_root, wrap)
from ..distributed.sharded_load import init_meta_adapters, load_report
from ..generation import SamplingParams
from ..lora import (LoraConfig, adapter_configs, final_adapter, inject_lora, load_adapter, lora_modules,
                    trainable_report, write_adapter)
from ..lora.vllm_format import VLLM_EXPERT_PARAMETERS, VLLM_MAX_LORA_RANKS, served_rank, vllm_max_lora_rank
from ..models import resolve_device
from ..models.loading import resolve_model
from ..rl import (CompletionBatches, GRPOObjective, HeldOutEval, LocalRollout, PolicySampler, RewardSet, RolloutBatch,
                  RolloutCompletion, ServerRollout, StaleRolloutError, adapter_weights, completion_logprobs, group_advantages,
                  logprob_gap, reference_policy, sequences_to_train, token_weights, trained_completions)
from ..rl.vllm_rollout import VllmRollout, import_vllm
from ..training import (
    start_run,
    build_optimizer,
    set_lr,
    MetricsWriter,
    Progress,
    check_same_run,
    latest_checkpoint,
    load_checkpoint_adapter,
    load_checkpoint_state,
    lr_at,
    plot_metrics,
    save_checkpoint,
    warmup_steps_for,
)
from ..training.rows import vocab_rows
from ..training.setup import choose_padding_free

ADAPTER = "default"
REFERENCE = "reference"
IN_FLIGHT_NAME = "inflight_rollouts.json"
IN_FLIGHT_ADAPTER = "inflight_adapter.safetensors"  # the adapter that sampled them (async's old policy)
"""An async run's checkpoint: the rollouts already sampled for the next step (per rank)."""
# Below this, an lr is a full fine-tune's; LoRA's updates need about 10x more to move as far.
FULL_FINETUNE_LR = 1e-5


def run(cfg: RunConfig, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train a LoRA adapter with GRPO as ``cfg`` says; return the directory of the final adapter.

    Under torchrun every rank runs this on its share of the prompts; rank 0 logs and writes files.
    """
    if not cfg.model:
        raise ValueError("config: 'model' is required (a local HF model directory)")
    if not cfg.data.train:
        raise ValueError("config: 'data.train' is required (a JSONL file of prompts)")
    device = resolve_device(cfg.train.device)
    info = init_distributed(cfg.train.distributed, device.type, cfg.train.dist_timeout_s)
    try:
        adapter_dir = _run(cfg, resume, log, info, device)
        barrier(info)
        return adapter_dir
    finally:
        shutdown(info)


def _run(cfg: RunConfig, resume: bool, log: Callable[[str], None], info, device: torch.device) -> Path:
    out = Path(cfg.output_dir)
    tc, gc, rc = cfg.train, cfg.grpo, cfg.rollout
    G = rc.num_generations
    check_rollout_layout(cfg, info)
    if rc.backend == "vllm":
        if rc.sync == "lora" and cfg.init_adapter:  # the config's own lora.* was checked when it loaded
            init = LoraConfig.from_json(cfg.init_adapter)
            rank = served_rank(init)
            if vllm_max_lora_rank(rank) is None:
                raise ValueError(f"init_adapter {cfg.init_adapter}: vLLM would receive a rank-{rank} adapter, over "
                                 f"{VLLM_MAX_LORA_RANKS[-1]}, the largest max_lora_rank vLLM accepts; use rollout.sync: merged")
            raw = [p for p in init.target_parameters or [] if p.rsplit(".", 1)[-1] not in VLLM_EXPERT_PARAMETERS]
            if raw:
                raise ValueError(f"init_adapter {cfg.init_adapter}: target_parameters '{raw[0]}' is not an MoE expert "
                                 "weight, and vLLM's LoRA covers no other raw parameter (a router); use rollout.sync: merged")
        import_vllm()  # not installed: say how to install it before any model loads
    run = start_run(cfg, info, device, log, sharded_load=True)
    device, dtype, tokenizer, model, log = run.device, run.dtype, run.tokenizer, run.model, run.log
    if gc.prompts_per_step % info.world:
        raise ValueError(f"grpo.prompts_per_step={gc.prompts_per_step} must be a multiple of the {info.world} ranks "
                         "(each rank samples whole groups)")
    if tc.lr < FULL_FINETUNE_LR:
        log(f"Warning: train.lr={tc.lr:g} looks like a full fine-tuning learning rate; LoRA usually wants about 10x "
            "more (RL with LoRA: 1e-5 to 1e-4 on large models, more on small ones)")

    # --- prompts and rewards --------------------------------------------------------------------
    vocab = vocab_rows(model)
    prompts, prompt_ids = load_prompts(cfg, tokenizer, cfg.data.train, "train", log, vocab)
    evals, eval_ids = load_prompts(cfg, tokenizer, cfg.data.eval, "eval", log, vocab) if cfg.data.eval else ([], [])
    if len(prompts) < gc.prompts_per_step:
        raise ValueError(f"{cfg.data.train}: {len(prompts)} prompts, fewer than grpo.prompts_per_step={gc.prompts_per_step}")
    rewards = RewardSet(gc.rewards)
    for record in (prompts[:1] + evals[:1]):  # a reward that cannot read the records fails now, not mid-run
        try:
            rewards.score([record.prompt], [""], [record.fields])
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{record.source}: grpo.rewards cannot score this record: {err}") from None

    # --- adapter and reference ------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    reference = attach_adapters(model, cfg, log)
    if run.sharded_load:  # the base is on meta: the adapter gets its real start here, same draws as one process
        init_meta_adapters(model)
    config = adapter_configs(model)[ADAPTER]
    if config.dropout > 0:
        log(f"Warning: LoRA dropout {config.dropout:g}: the sampler runs without dropout, so the trainer's log-probs "
            "differ from the sampler's; RL usually sets lora.dropout: 0")
    log("=" * 72)
    log(f"GRPO with LoRA on {type(model).__name__} ({cfg.model}): r={config.r}, alpha={config.alpha:g}, "
        f"{sum(1 for _ in lora_modules(model))} modules")
    log(str(trainable_report(model)))
    log("=" * 72)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    # --- resume (weights), wrap, optimizer, resume (state) ----------------------------------------
    state = {"step": 0, "epoch": 0, "sample": 0, "tokens": 0}
    resumed_from = latest_checkpoint(out) if resume else None
    if resume and resumed_from is None:
        log(f"--resume: no checkpoint in {out}; starting from scratch")
    if not resume and latest_checkpoint(out) is not None:
        raise ValueError(f"output_dir {out} already holds checkpoints of an earlier run; pass --resume to continue "
                         "it, or choose another output_dir (nothing was overwritten)")
    if resumed_from is not None:
        check_same_run(resumed_from, cfg, info.world, _RESUME_KEYS)
        if not run.sharded_load:
            load_checkpoint_adapter(resumed_from, model, ADAPTER)

    objective = GRPOObjective(rc.temperature, gc.clip_eps_low, gc.clip_eps_high, gc.beta)
    step_module = wrap(LossModule(model, objective), info, device, dtype, run.fsdp)
    if run.sharded_load:
        # After the deferred init (DoRA, PiSSA/OLoRA) as a one-process run loads after its init:
        # each rank copies its own region of the saved tensors into its shards.
        if cfg.init_adapter:
            attach_adapters(model, cfg, lambda _message: None)  # the adapters exist: this loads their values
        if resumed_from is not None:
            load_checkpoint_adapter(resumed_from, model, ADAPTER)
        log(load_report(run.fsdp.loaded, run.fsdp.checkpoint))
    padding_free = choose_padding_free(run, cfg, step_module, info)
    sampler = rollout_backend(cfg, model, tokenizer, info, device, dtype, step_module)  # after wrap: FSDP2 samples sharded
    # fp16 gradients underflow without loss scaling (bf16 and fp32 have fp32's exponent range).
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.loraplus_lr_ratio)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    steps_per_epoch = len(prompts) // gc.prompts_per_step
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    updates_per_step = gc.num_iterations * gc.mini_batches
    total_updates = total_steps * updates_per_step
    warmup = warmup_steps_for(total_updates, tc.warmup_ratio)
    log(f"GRPO: {total_steps} steps x {gc.prompts_per_step} prompts x {G} completions, {updates_per_step} optimizer "
        f"update(s) per step, lr {tc.lr:g} {tc.lr_scheduler}, clip [{1 - gc.clip_eps_low:g}, {1 + gc.clip_eps_high:g}], "
        f"beta {gc.beta:g}, {gc.loss_aggregation}-level loss, rollouts: {rc.backend}, {dtype} on {device}"
        + (f", {info.mode} x {info.world}" if info.mode != "none" else ""))
    if resumed_from is not None:
        state.update(load_checkpoint_state(resumed_from, model, optimizer, info, tc.seed, scaler))
        if state["step"] > total_steps:
            raise ValueError(f"{resumed_from} is at step {state['step']}, past this run's {total_steps} steps; "
                             "raise train.max_steps to continue it")
        log(f"Resumed from {resumed_from} (step {state['step']})")
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=state["step"] if resumed_from else None,
                            tensorboard_dir=out / "tb" if tc.tensorboard else None) if info.main else None

    def autocast():
        return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    def log_metrics(record: dict) -> None:
        if metrics is not None:
            metrics.log(record)

    evaluate = HeldOutEval(evals, eval_ids, rewards, gc.eval_max_new_tokens or rc.max_new_tokens, info, device)
    pad = pad_token_id(tokenizer)

    # --- loop -----------------------------------------------------------------------------------
    step_module.train()
    progress = Progress(total_steps, initial=state["step"]) if info.main else None
    last_saved = state["step"] if resumed_from else -1
    loop_start, steps_before = time.perf_counter(), state["step"]
    if evals and resumed_from is None:
        sampler.sync(0)
        score = evaluate(sampler.generate)
        log_metrics({"step": 0, evaluate.key: score})
        log(f"Held-out {evaluate.what} before training: {score:.3f} ({len(evals)} prompts)")
    slots = list(range(info.rank, gc.prompts_per_step, info.world))  # this rank's whole groups

    def rollout_inputs(epoch: int, sample: int, step: int) -> tuple[list[int], list[list[int]], list[SamplingParams]]:
        """This rank's prompts of a step, each repeated G times, and their sampling parameters.

        The prompt order is a function of (seed, epoch), and each completion's sampling seed of (seed,
        step, prompt slot, g): a resumed run, on any number of ranks, draws the same rollouts.
        """
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(tc.seed + epoch)).tolist()
        mine = [order[sample + s] for s in slots]
        sampling = [SamplingParams(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
                                   top_k=rc.top_k, seed=sampling_seed(tc.seed, step, slot, g))
                    for slot in slots for g in range(G)]
        return mine, [prompt_ids[index] for index in mine for _ in range(G)], sampling

    def in_flight(pending: Optional[Future]) -> tuple[dict[str, str], dict[str, dict[str, torch.Tensor]]]:
        """async: the next step's rollouts, sampled already, and the adapter that sampled them, as
        checkpoint files (waits for them): a resumed run trains on these very completions, as this
        one will, and checks their log-probs under the same adapter."""
        if pending is None:
            return {}, {}
        batch: RolloutBatch = pending.result()
        mine = {"version": batch.version, "fingerprint": batch.fingerprint,
                "synced": sampler.fingerprints.get(batch.version), "completions": [vars(c) for c in batch]}
        saved = gather_objects_to_main(mine, info)  # rank 0 alone writes the checkpoint
        held = dict(zip(param_names, held_versions[batch.version]))
        return ({IN_FLIGHT_NAME: json.dumps(saved)} if info.main else {}), {IN_FLIGHT_ADAPTER: held}

    def stale(message: str) -> None:
        if rc.check_sync == "error":
            raise StaleRolloutError(f"rollout.check_sync: {message}. Nothing of this step was saved; set "
                                    "rollout.check_sync: warn to go on regardless")
        if rc.check_sync == "warn":
            log(f"Warning: rollout.check_sync: {message}")

    max_gap = rc.max_logprob_gap or (1e-3 if sampler_dtype(cfg, dtype) == torch.float32 else 5e-2)
    background = ThreadPoolExecutor(max_workers=1) if rc.async_ else None
    pending: Optional[Future] = None  # async: the next step's rollouts, sampled while this step trains
    # async: the trained adapter's weights at each version still sampling, to compare the sampler's
    # log-probs with the trainer's under the very adapter that sampled (one adapter copy per rank)
    held_versions: dict[int, list[torch.Tensor]] = {}
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    param_names = [names_by_id[id(p)] for p in params]
    if resumed_from is not None and (resumed_from / IN_FLIGHT_NAME).is_file():
        pending = resumed_rollouts(resumed_from, info, sampler)
        held_versions[pending.result().version] = resumed_sampling_adapter(resumed_from, params, param_names)
    unverified = False  # warned that the backend cannot report which adapter it holds
    while state["step"] < total_steps:
        step_start = time.perf_counter()

        # 1. sample G completions per prompt from the current policy (async: from the policy one
        #    step back, sampled while the last step trained)
        mine, seq_prompts, sampling = rollout_inputs(state["epoch"], state["sample"], state["step"])
        if pending is None:
            sampler.sync(state["step"])
            rollout: RolloutBatch = sampler.generate(seq_prompts, sampling)
            expected = state["step"]
        else:
            rollout, pending, expected = pending.result(), None, state["step"] - 1
        problem = sampler.check_batch(rollout, expected)
        if problem is not None:
            stale(f"step {state['step'] + 1}: {problem}")
        if rollout.fingerprint is None and not unverified:
            unverified = True
            log(f"Warning: the {rc.backend} rollout backend does not report which adapter it holds (a server without "
                "adapter fingerprints, or vLLM's merged weights): only the log-prob check guards against a stale adapter")
        staleness, completions = state["step"] - rollout.version, rollout.completions
        sampled_by = held_versions.pop(rollout.version, None)  # async: the adapter that sampled it (None: current)
        sync_s = sampler.sync_s
        if background is not None and state["step"] + 1 < total_steps:
            sampler.sync(state["step"])  # the adapter as it is now: version step, trained on at step + 1
            held_versions[state["step"]] = [p.detach().clone() for p in params]
            sync_s = sampler.sync_s
            pending = background.submit(sampler.generate, *rollout_inputs(*advance(
                state["epoch"], state["sample"], gc.prompts_per_step, len(prompts)), state["step"] + 1)[1:])
        rollout_s = time.perf_counter() - step_start

        # 2. rewards and group advantages (groups never straddle ranks)
        records = [prompts[i] for i in mine for _ in range(G)]
        scored = rewards.score([r.prompt for r in records], [c.text for c in completions], [r.fields for r in records])
        reward = torch.tensor(scored.total, dtype=torch.float32)
        advantages, zero_std = group_advantages(reward, G, gc.scale_rewards)
        batches = CompletionBatches(seq_prompts, completions, tc.batch_size, pad, padding_free, device)
        lengths = batches.lengths
        keep, truncated, aborted = trained_completions([c.finish_reason for c in completions], gc.mask_truncated)

        # 3. old (sampling-time) and reference log-probs, when the loss needs them
        extra: dict[str, torch.Tensor] = {}
        if rc.async_:  # the sampler's policy is a step behind the trainer's: the ratio corrects for it
            extra["old_logp"] = sampler_logprobs(completions, rc.backend)
        elif updates_per_step > 1:
            extra["old_logp"] = completion_logprobs(step_module, batches.micro_batches(), autocast)
        # Trainer vs sampler log-probs of the sampled tokens, under the adapter that sampled them and
        # untempered (backends report the raw distribution's): equal up to numerics unless the backend
        # sampled another adapter. Read off the first training pass when that is the same forward.
        # Zero-advantage sequences add exactly nothing to the gradient unless a KL term (or its log)
        # reads them: they are skipped (kept in the normaliser below), often half a step's work.
        teaches = keep.bool() & ((advantages != 0) | (gc.beta > 0 or gc.log_kl))
        trains_any = all_reduce_sum(float(teaches.sum()), info, device) > 0
        mismatch, mismatch_n = 0.0, 0
        from_training = rc.temperature == 1.0 and sampled_by is None and updates_per_step == 1 and trains_any
        if not from_training:
            reuse = rc.temperature == 1.0 and sampled_by is None and updates_per_step > 1 and not rc.async_
            # A forward for the check alone covers one micro-batch (every rank runs one): a stale
            # adapter shows on every sequence, so the check stays whole at a bounded cost.
            checked = range(len(completions)) if reuse else range(min(tc.batch_size, len(completions)))
            if reuse:  # the trainer's own old log-probs, same forward
                trainer_logp = extra["old_logp"]
            else:
                with adapter_weights(params, sampled_by), objective.at_temperature(1.0):
                    trainer_logp = completion_logprobs(step_module, batches.micro_batches(checked), autocast)
            mismatch = logprob_gap(trainer_logp, checked, completions)
            mismatch_n = sum(len(completions[i].token_ids) for i in checked if completions[i].logprobs is not None)
        if gc.beta > 0 or gc.log_kl:
            with reference_policy(model, reference, ADAPTER):
                extra["ref_logp"] = completion_logprobs(step_module, batches.micro_batches(), autocast)
        extra["advantages"] = advantages.repeat_interleave(lengths.long())

        # 4. clipped policy updates: num_iterations passes, mini_batches optimizer steps each
        every = list(range(len(completions)))
        chunks = [every[k::gc.mini_batches] for k in range(gc.mini_batches)]
        skipped = 0
        width = int(lengths.max()) if len(lengths) else 0
        real = torch.arange(width)[None, :] < lengths[:, None]  # (B, T) completion tokens
        totals = {"loss": 0.0, "clipped": 0.0, "clipped_low": 0.0, "clipped_high": 0.0, "kl": 0.0, "tokens": 0.0}
        grad_norm = torch.zeros(())
        for iteration in range(gc.num_iterations):
            for c, chunk in enumerate(chunks):
                # Normalise over the whole mini-batch on all ranks, however it splits into micro-batches.
                n_tokens = all_reduce_sum(float((lengths[chunk] * keep[chunk]).sum()), info, device)
                n_seqs = all_reduce_sum(float(keep[chunk].sum()), info, device)
                weights = token_weights(real & keep[:, None], gc.loss_aggregation, n_tokens, n_seqs)
                extra["weights"] = weights[real]  # flat, in sequence order, like the log-probs
                trained = sequences_to_train(chunk, teaches, tc.batch_size, info, device)
                skipped += len(chunk) - len(trained)
                micro = list(batches.micro_batches(trained, extra))
                for k, batch in enumerate(micro):
                    last = k == len(micro) - 1
                    if info.mode == "fsdp2":
                        step_module.set_requires_gradient_sync(last)
                    sync = step_module.no_sync() if info.mode == "ddp" and not last else contextlib.nullcontext()
                    with sync:
                        with autocast():
                            loss, _ = step_module(batch)
                        # DDP and FSDP2 average gradients over ranks; the weights already sum over all.
                        scaled = loss * info.world
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    stats = objective.stats
                    totals["loss"] += float(loss.detach())
                    for key in ("clipped", "clipped_low", "clipped_high", "kl", "tokens"):
                        totals[key] += getattr(stats, key)
                    if from_training:
                        # Trainer vs sampler log-probs of the same tokens (before any update).
                        these = trained[k * tc.batch_size:(k + 1) * tc.batch_size]
                        mismatch += logprob_gap(objective.logp.cpu(), these, completions)
                        mismatch_n += sum(len(completions[i].token_ids) for i in these
                                          if completions[i].logprobs is not None)
                for param in params:  # nothing trained (all skipped): Adam still steps, on a zero gradient
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
                update = state["step"] * updates_per_step + iteration * gc.mini_batches + c
                lr = lr_at(update, total_updates, tc.lr, warmup, tc.lr_scheduler)
                set_lr(optimizer, lr)
                if scaler:  # skips the step when the fp16 gradients overflowed, and adapts the scale
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        # 5. bookkeeping: global statistics over all ranks
        def total(value: float) -> float:
            return all_reduce_sum(value, info, device)

        n = total(float(len(completions)))
        tokens_trained = total(float(sum(len(p) for p in seq_prompts) + lengths.sum()))
        mean_reward = total(float(reward.sum())) / n
        std_reward = math.sqrt(max(total(float((reward ** 2).sum())) / n - mean_reward ** 2, 0.0))
        trained_tokens = total(totals["tokens"])
        state["epoch"], state["sample"] = advance(state["epoch"], state["sample"], gc.prompts_per_step, len(prompts))
        state["step"] += 1
        state["tokens"] += int(tokens_trained)
        step = state["step"]
        record = {
            "step": step, "epoch": state["epoch"], "reward_mean": mean_reward, "reward_std": std_reward,
            **{f"reward/{name}": total(sum(values)) / n for name, values in scored.parts.items()},
            "zero_std_frac": total(float(zero_std.sum())) / (n / G),
            "completion_len": total(float(lengths.sum())) / n,
            "truncated_frac": total(float(truncated.sum())) / n,
            "aborted_frac": total(float(aborted.sum())) / n,  # the backend gave up on them: not trained
            # sequences whose forward/backward was skipped (zero advantage, no KL), per pass
            "skipped_frac": total(float(skipped)) / (n * gc.num_iterations),
            "clip_frac": total(totals["clipped"]) / max(trained_tokens, 1.0),
            "clip_low_frac": total(totals["clipped_low"]) / max(trained_tokens, 1.0),
            "clip_high_frac": total(totals["clipped_high"]) / max(trained_tokens, 1.0),
            "loss": total(totals["loss"]) / updates_per_step, "lr": lr, "grad_norm": float(full_tensor(grad_norm)),
            "tokens_per_s": tokens_trained / max(time.perf_counter() - step_start, 1e-9),
            "rollout_s": rollout_s, "step_s": time.perf_counter() - step_start, "sync_s": sync_s,
            "policy_version": rollout.version, "staleness": staleness,
        }
        if scored.correct is not None:
            record["accuracy"] = total(float(sum(scored.correct))) / n
        if "ref_logp" in extra:
            record["kl"] = total(totals["kl"]) / max(trained_tokens, 1.0)
        gap_n = total(float(mismatch_n))
        if gap_n:
            record["logprob_gap"] = total(mismatch) / gap_n
            if record["logprob_gap"] > max_gap:
                stale(f"step {step}: the trainer's and the {rc.backend} rollout backend's log-probs of the sampled tokens differ "
                      f"by {record['logprob_gap']:.2e} per token (over max_logprob_gap {max_gap:g}) under the adapter "
                      f"of version {rollout.version} that sampled them: the backend is not sampling that adapter "
                      "(a stale adapter, or the bare base)")
        if step % tc.logging_steps == 0 or step == total_steps:
            log_metrics(record)
        if progress is not None:
            shown = {"reward": mean_reward, **({"acc": record["accuracy"]} if "accuracy" in record else {}),
                     "zero_std": record["zero_std_frac"], "len": record["completion_len"]}
            if "kl" in record:
                shown["kl"] = record["kl"]
            progress.update(step, **shown)
        if evals and tc.eval_steps and step % tc.eval_steps == 0 and step != total_steps:
            sampler.sync(step)
            log_metrics({"step": step, evaluate.key: evaluate(sampler.generate)})
        if tc.save_steps and step % tc.save_steps == 0:
            files, tensors = in_flight(pending)
            save_checkpoint(out, step, model, optimizer, dict(state), info, ADAPTER, config_yaml=dump_config(cfg),
                            total_limit=tc.save_total_limit, scaler=scaler, extra_files=files, extra_tensors=tensors)
            last_saved = step
    if progress is not None:
        progress.close()
    if background is not None:
        background.shutdown(wait=True)
    runtime = time.perf_counter() - loop_start
    log(f"Trained {state['step'] - steps_before} GRPO steps in {runtime:.1f}s")

    # --- save -----------------------------------------------------------------------------------
    if evals:
        sampler.sync(state["step"])
        score = evaluate(sampler.generate)
        log_metrics({"step": state["step"], evaluate.key: score})
        log(f"Held-out {evaluate.what} after training: {score:.3f} ({len(evals)} prompts)")
    log_metrics({"step": state["step"], "train_runtime": runtime})
    if last_saved != state["step"]:
        save_checkpoint(out, state["step"], model, optimizer, dict(state), info, ADAPTER, config_yaml=dump_config(cfg),
                        total_limit=tc.save_total_limit, scaler=scaler)
    sampler.close()  # the final adapter is written below; free the server
    adapter_dir = out / "adapter"
    final_config, tensors = final_adapter(model, ADAPTER)
    if info.main:
        metrics.close()
        write_adapter(adapter_dir, final_config, tensors)
        curves = {"reward_mean": "reward (mean over sampled completions)",
                  evaluate.key: f"held-out {evaluate.what} (greedy)"}
        if rewards.accuracy and rewards.weights != {rewards.accuracy: 1.0}:  # else the same line as the reward
            curves["accuracy"] = "accuracy (samples)"
        if plot_metrics(out / "metrics.jsonl", out / "reward.png", curves, "reward / accuracy", "GRPO step"):
            log(f"Reward curve: {out / 'reward.png'}")
    log(f"Adapter saved to {adapter_dir}")
    return adapter_dir


def load_prompts(cfg: RunConfig, tokenizer, path: str, what: str, log: Callable[[str], None] = print,
                 vocab_size: Optional[int] = None) -> tuple[list[PromptRecord], list[list[int]]]:
    """Read a prompts file and tokenize each prompt (chat-rendered with a generation prompt when
    ``grpo.chat_template``); a prompt over ``grpo.max_prompt_len`` tokens, or with a token id past
    ``vocab_size`` (the model's embedding rows), is an error naming its line."""
    records, skipped = read_prompts(path, cfg.data.skip_invalid)
    ids = []
    for record in records:
        if cfg.grpo.chat_template:
            messages = record.messages or [{"role": "user", "content": record.prompt}]
            if cfg.data.system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": cfg.data.system_prompt}] + messages
            text = render_chat(tokenizer, messages, add_generation_prompt=True)
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            tokens = tokenizer(record.prompt)["input_ids"]
        if len(tokens) > cfg.grpo.max_prompt_len:
            raise ValueError(f"{record.source}: the prompt has {len(tokens)} tokens, over grpo.max_prompt_len="
                             f"{cfg.grpo.max_prompt_len}")
        try:
            check_vocab(tokens, vocab_size)
        except ValueError as err:
            raise ValueError(f"{record.source}: {err}") from None
        ids.append(tokens)
    log(f"{what} prompts: {path}: {len(records)} ({skipped} invalid lines skipped)")
    return records, ids


def attach_adapters(model: torch.nn.Module, cfg: RunConfig, log: Callable[[str], None] = print) -> Optional[str]:
    """Give ``model`` the trained adapter ``ADAPTER`` (new, or ``init_adapter``) and, when the
    reference is ``init_adapter``, a frozen copy of it as ``REFERENCE``.

    Returns:
        The reference adapter's name for ``reference_policy``: ``REFERENCE``, or None for the base.
    """
    gc = cfg.grpo
    reference = gc.reference if gc.reference != "auto" else ("init_adapter" if cfg.init_adapter else "base")
    if reference == "init_adapter" and not cfg.init_adapter:
        raise ValueError("grpo.reference=init_adapter needs init_adapter: DIR")
    if cfg.init_adapter:
        if reference == "init_adapter":  # loaded first: the trainable copy's load freezes everything else
            load_adapter(model, cfg.init_adapter, adapter_name=REFERENCE, activate=False)
        load_adapter(model, cfg.init_adapter, adapter_name=ADAPTER, trainable=True)
        log(f"Starting from adapter {cfg.init_adapter}; reference: "
            + ("a frozen copy of it" if reference == "init_adapter" else "the base model"))
    else:
        lora_config = cfg.lora.to_lora_config(default_dropout=0.0, task_type="CAUSAL_LM",
                                              base_model_name_or_path=cfg.model)
        inject_lora(model, lora_config, adapter_name=ADAPTER)
    return REFERENCE if reference == "init_adapter" else None


def rollout_backend(cfg: RunConfig, model: torch.nn.Module, tokenizer, info: DistInfo, device: torch.device,
                    dtype: torch.dtype, step_module: Optional[torch.nn.Module] = None) -> PolicySampler:
    """The sampler ``rollout.backend`` asks for, on the policy's adapter ``ADAPTER``.

    A server receives only adapter files; a local backend samples with the policy's own weights.
    Under FSDP2 (``step_module``: the wrapped root) those are sharded, so every forward is a
    collective: all ranks sample together in lockstep, inside the root's forward, and a rank whose
    rows are done runs dummy forwards until every rank's are. No rank holds more than its shards
    plus the block being gathered (no second copy of the base).
    """
    rc, out = cfg.rollout, Path(cfg.output_dir)
    eos = collect_eos_ids(tokenizer, getattr(model, "generation_config", None))
    if rc.backend == "server":
        api_key = rc.api_key or os.environ.get("LORAKIT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        server = ServerRollout(rc.base_url, Path(rc.adapter_dir or out / "rollout_adapters"), eos, api_key,
                               rc.timeout_s, rc.concurrency, name=server_run_name(out), main=info.main)
        return PolicySampler(server, model, ADAPTER, info)
    if rc.backend == "vllm":
        config, vc = adapter_configs(model)[ADAPTER], rc.vllm
        if rc.sync == "lora" and (config.use_dora or config.modules_to_save):
            raise ValueError("rollout.backend: vllm with rollout.sync: lora cannot serve "
                             + ("DoRA (lora.use_dora)" if config.use_dora else "lora.modules_to_save")
                             + "; use rollout.sync: merged" + ("" if config.use_dora else " (without modules_to_save)"))
        experts_only = ("gate_up_proj", "up_proj", "down_proj")
        odd = [t for t in config.target_parameters or [] if t.rsplit(".", 1)[-1] not in experts_only]
        if rc.sync == "lora" and odd:
            raise ValueError(f"rollout.backend: vllm with rollout.sync: lora cannot serve LoRA on {odd} "
                             "(lora.target_parameters): vLLM has MoE LoRA for the experts' gate/up/down weights only; "
                             "use rollout.sync: merged, or leave them out")
        if config.modules_to_save:
            raise ValueError("rollout.sync: merged loads the adapted layers' merged weights only, not "
                             "lora.modules_to_save; train without it to sample with vLLM")
        longest = cfg.grpo.max_prompt_len + max(rc.max_new_tokens, cfg.grpo.eval_max_new_tokens or 0)
        # The adapter vLLM receives: rank_pattern's largest rank, PiSSA/OLoRA converted to rank 2r.
        backend = VllmRollout(resolve_model(cfg.model), eos, served_rank(config) if rc.sync == "lora" else None,
                             dtype=vllm_dtype_name(sampler_dtype(cfg, dtype)), max_model_len=vc.max_model_len or longest,
                             gpu_memory_utilization=vc.gpu_memory_utilization, enforce_eager=vc.enforce_eager,
                             tensor_parallel_size=vc.tensor_parallel_size, seed=vc.seed, sleep=vc.sleep,
                             external_launcher=info.world > 1, cpu_kvcache_gib=vc.cpu_kvcache_gib)
        return PolicySampler(backend, model, ADAPTER, info)
    if info.mode == "fsdp2" and step_module is not None:
        local = LocalRollout(model, tokenizer, ADAPTER, rc.max_batch, shares_policy=True, lockstep=any_rank(info, device),
                             within=lambda fn: through_root(step_module, info, lambda _model: fn()))
        return PolicySampler(local, model, ADAPTER, info)
    return PolicySampler(LocalRollout(model, tokenizer, ADAPTER, rc.max_batch, shares_policy=True), model, ADAPTER, info)


# The name before rollout backends and lorakit's generation engine had distinct names.
rollout_engine = rollout_backend


def sampler_dtype(cfg: RunConfig, dtype: torch.dtype) -> torch.dtype:
    """The dtype the rollout backend computes in: rollout.vllm.dtype for vLLM (auto: the trainer's), else the trainer's."""
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if cfg.rollout.backend == "vllm" and cfg.rollout.vllm.dtype != "auto":
        return names[cfg.rollout.vllm.dtype]
    return dtype


def vllm_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sampler_logprobs(completions, backend: str) -> torch.Tensor:
    """The sampler's log-probs of every completion token, flat in sequence order (async's old log-probs)."""
    missing = sum(1 for c in completions if c.logprobs is None)
    if missing:
        raise ValueError(f"rollout.async: the {backend} rollout backend reported no log-probs for {missing} of {len(completions)} "
                         "completions; the importance ratio needs the sampler's log-prob of every sampled token")
    return torch.tensor([lp for c in completions for lp in c.logprobs], dtype=torch.float32)


def resumed_rollouts(checkpoint: Path, info: DistInfo, sampler: PolicySampler) -> Future:
    """The in-flight rollouts an async run saved in ``checkpoint`` (this rank's), as a done future;
    the sampler learns the fingerprint the trainer synced for their version, to check them against."""
    saved = json.loads((checkpoint / IN_FLIGHT_NAME).read_text())
    if len(saved) != info.world:
        raise ValueError(f"{checkpoint}: an async run's in-flight rollouts were sampled by {len(saved)} ranks; "
                         f"resume it on {len(saved)} ranks (this run has {info.world})")
    mine = saved[info.rank]
    if mine["synced"] is not None:
        sampler.fingerprints[mine["version"]] = mine["synced"]
    batch = RolloutBatch([RolloutCompletion(**c) for c in mine["completions"]], mine["version"], mine["fingerprint"])
    done: Future = Future()
    done.set_result(batch)
    return done


def resumed_sampling_adapter(checkpoint: Path, params: list[torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    """The adapter that sampled an async run's in-flight rollouts, as saved in ``checkpoint``, one
    tensor per trained parameter, sharded like it (FSDP2: this rank's shard)."""
    path = checkpoint / IN_FLIGHT_ADAPTER
    if not path.is_file():
        raise ValueError(f"{checkpoint}: in-flight rollouts without {IN_FLIGHT_ADAPTER}, the adapter that sampled them "
                         "(a checkpoint of an older lorakit); resume from a checkpoint this version wrote")
    saved = load_file(str(path))
    missing = [name for name in names if name not in saved]
    if missing:
        raise ValueError(f"{path}: no tensor for {len(missing)} trained parameters (e.g. {missing[0]}): "
                         "it was written for another adapter")
    return [like_param(saved[name], param).detach() for name, param in zip(names, params)]


def advance(epoch: int, sample: int, prompts_per_step: int, num_prompts: int) -> tuple[int, int]:
    """The (epoch, first prompt of the order) after a step: a new epoch when the next step's prompts do not fit."""
    sample += prompts_per_step
    return (epoch + 1, 0) if sample + prompts_per_step > num_prompts else (epoch, sample)


def sampling_seed(seed: int, step: int, slot: int, g: int) -> int:
    """The sampling seed of completion ``g`` of the prompt in ``slot`` at ``step``: a function of these
    alone, so a resumed run on any number of ranks draws the same rollouts.

    A hash, not a linear mix: any number of prompts per step and completions per prompt gets
    seeds that no other (step, slot, g) of the run shares (a linear mix with fixed strides repeats
    once slot or g passes the stride). Below 2**63, as samplers (vLLM, servers) take signed 64-bit seeds.
    """
    digest = hashlib.blake2b(f"{seed}/{step}/{slot}/{g}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def server_run_name(output_dir: Path) -> str:
    """The adapter name a run uses on a shared rollout server: the output directory's name (readable
    in the server's model list) and a hash of its absolute path, so two runs whose output
    directories share a name (runs/a/grpo, runs/b/grpo) never load or unload each other's adapter."""
    resolved = Path(output_dir).resolve()
    name = re.sub(r"[^A-Za-z0-9_-]", "-", resolved.name) or "grpo"
    return f"{name}-{hashlib.blake2b(str(resolved).encode(), digest_size=4).hexdigest()}"


def check_rollout_layout(cfg: RunConfig, info: DistInfo) -> None:
    """Refuse rollout settings the launch cannot run correctly, before any model loads.

    Raises:
        ValueError: ``rollout.vllm.tensor_parallel_size > 1`` under torchrun: each rank holds its own
            vLLM instance (vLLM's external launcher) and samples its own prompts, so a tensor-parallel
            instance spanning ranks would be fed different prompts by each of them.
    """
    tp = cfg.rollout.vllm.tensor_parallel_size
    if cfg.rollout.backend == "vllm" and tp > 1 and info.world > 1:
        raise ValueError(f"rollout.vllm.tensor_parallel_size={tp} with {info.world} torchrun ranks: each rank runs "
                         "its own vLLM instance on its own prompts, so one tensor-parallel instance across ranks would "
                         "mix their prompts; use tensor_parallel_size: 1 under torchrun (one instance per rank), or "
                         "rollout.backend: server with a vLLM server that runs its own tensor parallelism")


# What must not change between a run and its resumption (prompt order, sampling, the adapter's math).
_RESUME_KEYS = ("data.train", "data.system_prompt", "train.seed", "grpo.prompts_per_step", "grpo.chat_template",
                "rollout.backend", "rollout.async_",
                "grpo.rewards", "rollout.num_generations", "rollout.temperature", "rollout.top_p", "rollout.top_k",
                "rollout.max_new_tokens", "train.loraplus_lr_ratio", "quantization", "lora.use_dora", "lora.init_lora_weights", "lora.r", "lora.alpha", "lora.target_modules", "lora.use_rslora",
                "init_adapter")

"""lorakit vs TRL (+ PEFT) on the real model SmolLM2-135M-Instruct: the same task, model, data, LoRA
settings, steps, generations per prompt, learning rate, batch and sequence length, fp32 on the CPU.

  python benchmarks/real_model.py sft  [--repeats 3] [--max-steps N]
  python benchmarks/real_model.py grpo [--repeats 3] [--max-steps N] [--init-adapter DIR]
  python benchmarks/real_model.py all  [...]            # sft, then grpo
  python benchmarks/real_model.py show-mapping          # lorakit's config -> TRL's arguments, nothing runs

**SFT**: ``configs/smollm2_quickstart.yaml`` (the identity mix). lorakit: ``python -m lorakit train
<config> output_dir=...``. TRL: ``SFTTrainer`` + PEFT ``LoraConfig`` with every value read from the
same YAML (:func:`sft_trl_args`), at its best correct CPU settings: assistant-only loss (TRL's
``assistant_only_loss``; SmolLM2's template has no ``{% generation %}`` markers and TRL cannot patch
it, so TRL gets :data:`SMOLLM2_TRAINING_TEMPLATE`, the same template with the markers), and
``padding_free=True`` (each batch one row with restarting position ids; no compute on padding, as
lorakit). Before timing, a ``verify`` child checks that TRL's token ids and loss mask equal lorakit's
(``lorakit.data.encode_all``) for every sample, and that TRL's padding-free loss on its first batch
equals each sample run alone (``sft_throughput.padding_free_check``); it stops if not. Scored with
``smollm2_identity.score``: identity on held-out paraphrases, general answers the base had right kept.

**GRPO**: ``configs/smollm2_arith_grpo.yaml`` from the warm start of ``configs/smollm2_arith_sft.yaml``
(trained once here with ``lorakit train``, or ``--init-adapter``). TRL: ``GRPOTrainer`` on
``PeftModel.from_pretrained(base, warm_start, is_trainable=True)``, rewards = the config's lorakit
rewards (``numeric_match``) wrapped as TRL reward functions, every setting mapped from the YAML
(:func:`grpo_trl_args`): lorakit's token-level loss (every completion token of the rollout batch
weighs the same) is TRL's ``loss_type="dapo"``; lorakit's sequence-level is ``"grpo"``; std-scaled
group advantages ``scale_rewards="group"``; clip bounds ``epsilon``/``epsilon_high``; ``beta`` as is
(both 0 here: no reference pass; with beta > 0 TRL's reference would be the bare base, lorakit's the
frozen warm start). TRL's prompt order is set to lorakit's (seeded permutation, no shuffle), so both
sample the same prompts at every step. lorakit's in-run held-out evaluation is switched off
(``data.eval=null``) so its wall time holds training only; both adapters are scored afterwards with
``smollm2_arith.score`` (held-out greedy accuracy).

**Measured per run**, each side in its own process (alternating lorakit/TRL order over repeats):
wall-clock of the process, training-loop time (lorakit's ``train_runtime``, TRL's
``train_runtime``), trained tokens/s (real tokens, no padding: lorakit's count; TRL's
``num_tokens``), peak RSS of the process (``os.wait4``'s rusage), final scores. Printed: median,
min-max spread and the per-repeat lorakit/TRL ratio (``_report``).

**FLOP/s** (model FLOPs, the same count for both sides; N_* from ``_report.lora_flops_per_token``):

* SFT step: ``T * (4 * N_body + 6 * N_lora) + L * 4 * N_head`` for T tokens of which L are labelled:
  the frozen weights do a forward (2 per weight) and an input-gradient backward (2), no weight
  gradients (the ``6N`` of a full fine-tune would overstate a LoRA step by half); the adapter does all
  three (6); the output head is needed only where a loss is taken (lorakit computes only those rows,
  TRL all of them, so TRL executes more than it is credited). Attention scores are left out (small
  at these lengths).
* Rollouts: ``2 * (N_matmul + N_lora)`` per generated token (the prompts' prefill is not counted,
  so this is a lower bound), over the time spent generating (lorakit's ``rollout_s``, TRL's
  ``_generate_single_turn``, timed by a subclass).

Both against this host's fp32 matmul peak, measured in the same invocation with
``matmul_peak.gflops`` (square 1024 fp32 matmuls, median of 3) before the runs. Figures come from a
loaded, shared machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import load, lora_flops_per_token, ratios, spread, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SFT_CONFIG = ROOT / "configs" / "smollm2_quickstart.yaml"
WARM_CONFIG = ROOT / "configs" / "smollm2_arith_sft.yaml"
GRPO_CONFIG = ROOT / "configs" / "smollm2_arith_grpo.yaml"
MODEL = "smollm2-135m-instruct"

# SmolLM2-135M-Instruct's own chat template with TRL's {% generation %} markers around what an
# assistant turn adds (its text, <|im_end|> and the newline: what lorakit labels, checked per sample
# by the verify child). Rendered without markers it is the model's template, character for character.
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# --- lorakit config -> TRL arguments ----------------------------------------------------------------

def _scheduler(cfg) -> str:
    """lorakit's schedule as transformers' name (its "constant" has no warm-up; lorakit's may)."""
    if cfg.train.lr_scheduler == "constant" and cfg.train.warmup_ratio > 0:
        return "constant_with_warmup"
    return cfg.train.lr_scheduler


def peft_lora_args(cfg, default_dropout: float) -> dict:
    """PEFT ``LoraConfig`` keyword arguments for the run's ``lora`` section."""
    lora = cfg.lora
    if lora.use_dora or lora.target_parameters or lora.modules_to_save or lora.init_lora_weights is not True:
        raise SystemExit("real_model.py maps plain LoRA only (no DoRA, target_parameters, modules_to_save, PiSSA)")
    return {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": default_dropout if lora.dropout is None else lora.dropout,
            "target_modules": lora.target_modules, "use_rslora": lora.use_rslora, "exclude_modules": lora.exclude_modules,
            "rank_pattern": dict(lora.rank_pattern), "alpha_pattern": dict(lora.alpha_pattern), "task_type": "CAUSAL_LM"}


def _common_trl_args(cfg, output_dir: str, max_steps: Optional[int]) -> dict:
    tc = cfg.train
    return {"output_dir": output_dir, "learning_rate": tc.lr, "lr_scheduler_type": _scheduler(cfg),
            "warmup_steps": tc.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the steps
            "weight_decay": tc.weight_decay, "max_grad_norm": tc.max_grad_norm, "seed": tc.seed,
            "gradient_checkpointing": tc.gradient_checkpointing, "max_steps": max_steps or tc.max_steps or -1,
            "use_cpu": True, "bf16": False, "fp16": False, "logging_steps": 1, "save_strategy": "no", "report_to": [],
            "dataloader_num_workers": 0, "disable_tqdm": True}


def sft_trl_args(cfg, output_dir: str, max_steps: Optional[int] = None) -> tuple[dict, dict]:
    """``(SFTConfig kwargs, peft LoraConfig kwargs)`` for the lorakit SFT config ``cfg``.

    TRL refuses a ``max_length`` with padding-free rows (it would not truncate them), so it gets
    none; the verify child checks that no sample is longer than ``train.max_seq_len``, so neither
    side truncates."""
    tc = cfg.train
    if tc.padding_free and tc.packing:
        raise SystemExit(f"train.packing and train.padding_free both set in {cfg}: choose one")
    args = {**_common_trl_args(cfg, output_dir, max_steps), "per_device_train_batch_size": tc.batch_size,
            "gradient_accumulation_steps": tc.grad_accum, "num_train_epochs": tc.epochs,
            "assistant_only_loss": True, "padding_free": not tc.packing, "packing": tc.packing,
            "max_length": tc.max_seq_len if tc.packing else None}
    return args, peft_lora_args(cfg, 0.05)


def grpo_trl_args(cfg, output_dir: str, max_steps: Optional[int] = None) -> dict:
    """``GRPOConfig`` kwargs for the lorakit GRPO config ``cfg``.

    lorakit's step samples ``prompts_per_step x num_generations`` completions and makes
    ``num_iterations x mini_batches`` optimizer updates on them, in micro-batches of
    ``train.batch_size`` completions; TRL's ``max_steps`` counts optimizer updates."""
    tc, gc, rc = cfg.train, cfg.grpo, cfg.rollout
    completions = gc.prompts_per_step * rc.num_generations
    if completions % (gc.mini_batches * tc.batch_size):
        raise SystemExit(f"grpo.prompts_per_step x rollout.num_generations = {completions} is not a multiple of "
                         f"grpo.mini_batches x train.batch_size = {gc.mini_batches} x {tc.batch_size}")
    accum = completions // (gc.mini_batches * tc.batch_size)
    steps = max_steps or tc.max_steps
    if not steps:
        raise SystemExit(f"{GRPO_CONFIG.name}: set train.max_steps (or --max-steps)")
    args = _common_trl_args(cfg, output_dir, steps * gc.num_iterations * gc.mini_batches)
    args.update({
        "per_device_train_batch_size": tc.batch_size, "gradient_accumulation_steps": accum,
        "steps_per_generation": accum * gc.mini_batches, "num_generations": rc.num_generations,
        "num_iterations": gc.num_iterations, "max_completion_length": rc.max_new_tokens,
        "temperature": rc.temperature, "top_p": rc.top_p, "top_k": rc.top_k, "beta": gc.beta,
        "epsilon": gc.clip_eps_low, "epsilon_high": gc.clip_eps_high,
        "scale_rewards": "group" if gc.scale_rewards else "none",
        "loss_type": {"token": "dapo", "sequence": "grpo"}[gc.loss_aggregation],
        "mask_truncated_completions": gc.mask_truncated, "reward_weights": list(gc.rewards.values()),
        "shuffle_dataset": False,  # the dataset comes in lorakit's order (grpo_prompts)
    })
    return args


def grpo_prompts(cfg, tokenizer) -> list[dict]:
    """The training prompts as TRL rows (conversational prompt + the record's fields), in the order
    lorakit's GRPO draws them in epoch 0: ``torch.randperm(n, seed + epoch)`` (recipes/grpo.py)."""
    import torch

    from lorakit.recipes.grpo import load_prompts

    records, _ = load_prompts(cfg, tokenizer, cfg.data.train, "train", log=lambda _: None)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
    rows = []
    for i in order:
        r = records[i]
        messages = r.messages or [{"role": "user", "content": r.prompt}]
        if cfg.data.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.data.system_prompt}] + messages
        rows.append({"prompt": messages, **{k: v for k, v in r.fields.items() if k not in ("prompt", "messages")}})
    return rows


def trl_reward_functions(cfg) -> list:
    """The config's lorakit rewards, each as a TRL reward function (weights go to ``reward_weights``)."""
    from lorakit.rl.rewards import resolve_reward

    def wrap(name: str):
        fn = resolve_reward(name)

        def reward(prompts, completions, **fields) -> list[float]:
            out = []
            for i, (prompt, completion) in enumerate(zip(prompts, completions)):
                text = completion[-1]["content"] if isinstance(completion, list) else completion
                question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
                record = {k: v[i] for k, v in fields.items() if isinstance(v, list) and len(v) == len(prompts)
                          and k not in ("completion_ids", "trainer_state")}
                out.append(float(fn(question, text, **record)))
            return out

        reward.__name__ = name
        return reward

    return [wrap(name) for name in cfg.grpo.rewards]


# --- children: one run each ------------------------------------------------------------------------

def _model_dir() -> str:
    from lorakit.models.loading import resolve_model

    return resolve_model(MODEL)


def _sft_trainer(cfg, out: str, max_steps: Optional[int]):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lorakit.data import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    tokenizer.chat_template = SMOLLM2_TRAINING_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(_model_dir(), dtype=torch.float32)
    samples, _ = read_jsonl(ROOT / cfg.data.train, cfg.data.format, cfg.data.skip_invalid, cfg.data.system_prompt)
    dataset = Dataset.from_list([{"messages": s.messages} for s in samples])
    args, lora = sft_trl_args(cfg, out, max_steps)
    return SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=dataset, processing_class=tokenizer,
                      peft_config=LoraConfig(**lora))


def child_verify(cfg) -> dict:
    """TRL's tokens and loss mask vs lorakit's, per sample; TRL's padding-free loss vs each sample alone."""
    from sft_throughput import padding_free_check
    from transformers import AutoTokenizer

    from lorakit.data import IGNORE, encode_all, read_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        trainer = _sft_trainer(cfg, tmp, 1)
        tokenizer = AutoTokenizer.from_pretrained(_model_dir())
        samples, _ = read_jsonl(ROOT / cfg.data.train, cfg.data.format, cfg.data.skip_invalid, cfg.data.system_prompt)
        encoded, dropped = encode_all(tokenizer, samples, 10 ** 6)
        theirs = trainer.train_dataset
        same_ids = [list(e.input_ids) == list(ids) for e, ids in zip(encoded, theirs["input_ids"])]
        # TRL's labels: the token where its assistant mask is set, -100 elsewhere; lorakit's alike.
        same_mask = [list(e.labels) == list(labels) for e, labels in zip(encoded, theirs["labels"])]
        check = padding_free_check(trainer)
    return {**check, "samples": len(encoded), "trl_samples": len(theirs), "dropped": dropped,
            "same_ids": sum(same_ids), "same_mask": sum(same_mask), "longest": max(len(e.input_ids) for e in encoded),
            "labelled_lorakit": sum(sum(x != IGNORE for x in e.labels) for e in encoded), "tokens_lorakit": sum(len(e.input_ids) for e in encoded)}


def child_trl_sft(cfg, out: str, max_steps: Optional[int]) -> dict:
    trainer = _sft_trainer(cfg, out, max_steps)
    result = trainer.train()
    trainer.model.save_pretrained(Path(out) / "adapter")
    logged = [h for h in trainer.state.log_history if "num_tokens" in h]
    return {"runtime": result.metrics["train_runtime"], "tokens": int(logged[-1]["num_tokens"]),
            "steps": trainer.state.global_step, "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def child_trl_grpo(cfg, out: str, max_steps: Optional[int], init_adapter: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """Times the rollouts (measurement only: the generation itself is TRL's)."""

        rollout_s, generated = 0.0, 0

        def _generate_single_turn(self, *args, **kwargs):
            start = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
            self.rollout_s += time.perf_counter() - start
            self.generated += sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

    tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    base = AutoModelForCausalLM.from_pretrained(_model_dir(), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=trl_reward_functions(cfg),
                               args=GRPOConfig(**grpo_trl_args(cfg, out, max_steps)),
                               train_dataset=Dataset.from_list(grpo_prompts(cfg, tokenizer)), processing_class=tokenizer)
    result = trainer.train()
    trainer.model.save_pretrained(Path(out) / "adapter")
    logged = [h for h in trainer.state.log_history if "num_tokens" in h]
    return {"runtime": result.metrics["train_runtime"], "tokens": int(logged[-1]["num_tokens"]),
            "steps": trainer.state.global_step, "rollout_s": trainer.rollout_s, "generated": trainer.generated,
            "reward": [h["reward"] for h in trainer.state.log_history if "reward" in h]}


def child(args: argparse.Namespace) -> None:
    from lorakit.config import load_config

    if args.side == "verify":
        result = child_verify(load_config(SFT_CONFIG))
    elif args.side == "trl-sft":
        result = child_trl_sft(load_config(SFT_CONFIG), args.out, args.max_steps)
    else:
        result = child_trl_grpo(load_config(GRPO_CONFIG), args.out, args.max_steps, args.init_adapter)
    print("RESULT " + json.dumps(result), flush=True)


# --- parent: launch, measure, report ---------------------------------------------------------------

def run_process(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` (output to ``log_path``); its wall time and its own peak RSS (``os.wait4``)."""
    start = time.perf_counter()
    with open(log_path, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def run_child(side: str, out: Path, args: argparse.Namespace, init_adapter: Optional[str] = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--side", side, "--out", str(out)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    if init_adapter:
        cmd += ["--init-adapter", init_adapter]
    measured = run_process(cmd, out / "log.txt")
    line = next(x for x in (out / "log.txt").read_text().splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[7:]), **measured}


def run_lorakit(config: Path, out: Path, args: argparse.Namespace, extra: list[str] = ()) -> dict:
    """``python -m lorakit train`` of ``config``; its loop time, tokens and rollout time from metrics.jsonl."""
    overrides = [f"output_dir={out}", *extra] + ([f"train.max_steps={args.max_steps}"] if args.max_steps else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    measured = run_process([sys.executable, "-m", "lorakit", "train", str(config), *overrides], out.parent / f"{out.name}.log")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = next(r for r in records if "train_runtime" in r)
    steps = [r for r in records if "step_s" in r]
    result = {"runtime": summary["train_runtime"], "steps": summary["step"], **measured}
    if steps:  # GRPO: per-step records
        result["tokens"] = round(sum(r["tokens_per_s"] * r["step_s"] for r in steps))
        result["rollout_s"] = sum(r["rollout_s"] for r in steps)
        result["reward"] = [r["reward_mean"] for r in steps]
        result["generated"] = None  # filled by the caller: completion_len x completions per step
        result["completion_len"] = [r["completion_len"] for r in steps]
    else:
        result["tokens"] = summary["train_tokens"]
        result["loss"] = [r["loss"] for r in records if "loss" in r]
    return result


def matmul_peak_gflops() -> dict:
    """This host's fp32 matmul peak now (``matmul_peak.gflops``, 1024^3, median of 3)."""
    import torch
    from matmul_peak import gflops

    runs = [gflops(1024, torch.float32, "cpu") for _ in range(3)]
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "threads": torch.get_num_threads()}


def flop_counts(cfg) -> dict:
    from transformers import AutoConfig

    return lora_flops_per_token(AutoConfig.from_pretrained(_model_dir()), cfg.lora.r, cfg.lora.target_modules)


def report_pairs(task: str, runs: dict[str, list[dict]], fields: list[tuple[str, str, str]]) -> dict:
    """Print median (min-max) per side and per-repeat lorakit/TRL ratios for each (key, label, format)."""
    summary: dict[str, Any] = {}
    for key, label, fmt in fields:
        line = f"[{task}] {label:22s}"
        for side in runs:
            values = [r[key] for r in runs[side]]
            summary.setdefault(side, {})[key] = values
            line += f"  {side} {spread(values, fmt)}"
        if len(runs) == 2 and all(r[key] for r in runs["trl"]):
            ratio = ratios([r[key] for r in runs["lorakit"]], [r[key] for r in runs["trl"]])
            summary.setdefault("ratio", {})[key] = ratio
            line += f"  lorakit/trl {spread(ratio, '.2f')}"
        print(line, flush=True)
    return summary


def bench_sft(args: argparse.Namespace, work: Path, peak: dict, report: dict) -> None:
    from lorakit.config import load_config

    from smollm2_identity import score

    cfg = load_config(SFT_CONFIG)
    flops = flop_counts(cfg)
    sides = ["lorakit", "trl"] if args.peer == "trl" else ["lorakit"]
    entry: dict[str, Any] = {"config": str(SFT_CONFIG.relative_to(ROOT)), "model": flops, "max_steps": args.max_steps}
    report["sft"] = entry
    if args.peer == "trl":
        check = run_child("verify", work / "sft-verify", args)
        entry["trl_check"] = check
        print(f"[sft] TRL vs lorakit tokenization: {check['same_ids']}/{check['samples']} samples same ids, "
              f"{check['same_mask']}/{check['samples']} same loss mask; TRL padding-free loss on its first batch "
              f"{check['trl_loss']:.6f}, each sample alone {check['oracle_loss']:.6f}", flush=True)
        if not (check["ok"] and check["same_ids"] == check["same_mask"] == check["samples"] == check["trl_samples"]):
            raise SystemExit("[sft] TRL's batches differ from lorakit's (see above): not benchmarking them")
        if check["longest"] > cfg.train.max_seq_len:
            raise SystemExit(f"[sft] a sample has {check['longest']} tokens, over train.max_seq_len: one side would truncate")
        labelled, tokens_epoch = check["labelled_lorakit"], check["tokens_lorakit"]
    else:
        labelled = tokens_epoch = None
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side in (sides if repeat % 2 == 0 else sides[::-1]):
            out = work / f"sft-{side}-{repeat}"
            result = (run_lorakit(SFT_CONFIG, out, args) if side == "lorakit" else run_child("trl-sft", out, args))
            result["adapter"] = str(out / "adapter")
            result["tokens_per_s"] = result["tokens"] / result["runtime"]
            # Labelled tokens scale with the tokens trained (the same samples, epochs of the same data).
            lab = labelled * result["tokens"] / tokens_epoch if labelled else 0
            step_flops = (result["tokens"] * (4 * (flops["matmul_params"] - flops["head_params"]) + 6 * flops["lora_params"])
                          + lab * 4 * flops["head_params"])
            result["gflop_per_s"] = step_flops / result["runtime"] / 1e9
            result["of_fp32_peak"] = result["gflop_per_s"] / peak["median"]
            runs[side].append(result)
            print(f"[sft] repeat {repeat} {side}: {result['tokens']:,} tokens in {result['runtime']:.0f}s "
                  f"({result['tokens_per_s']:.0f} tokens/s, {result['gflop_per_s']:.1f} GFLOP/s), wall "
                  f"{result['wall_s']:.0f}s, peak RSS {result['peak_rss_mb']:.0f} MB; {load()}", flush=True)
            entry["runs"] = runs
            if args.json:
                write_json(args.json, report)
    scores = score([r["adapter"] for side in sides for r in runs[side]], show=False)
    for s in scores[1:]:
        run = next(r for side in sides for r in runs[side] if r["adapter"] == s["adapter"])
        run.update(identity=s["identity"], general_kept=s["general_kept"])
    entry["base"] = {k: scores[0][k] for k in ("identity", "general_base_right", "identity_of")}
    print(f"[sft] base: identity {scores[0]['identity']}/{scores[0]['identity_of']}, general right "
          f"{scores[0]['general_base_right']}")
    entry["summary"] = report_pairs("sft", runs, [
        ("tokens_per_s", "trained tokens/s", ".0f"), ("runtime", "train loop s", ".0f"), ("wall_s", "wall s", ".0f"),
        ("peak_rss_mb", "peak RSS MB", ".0f"), ("gflop_per_s", "GFLOP/s", ".1f"), ("of_fp32_peak", "of fp32 peak", ".3f"),
        ("identity", f"identity /{scores[0]['identity_of']}", ".0f"),
        ("general_kept", f"kept /{scores[0]['general_base_right']}", ".0f")])
    print(f"[sft] fp32 matmul peak {peak['median']:.1f} GFLOP/s; {load()}", flush=True)
    if args.json:
        write_json(args.json, report)


def warm_start(args: argparse.Namespace, work: Path) -> str:
    if args.init_adapter:
        return str(Path(args.init_adapter).resolve())
    out = work / "warm-start"
    print(f"[grpo] training the warm start once: lorakit train {WARM_CONFIG.relative_to(ROOT)}", flush=True)
    plain = argparse.Namespace(**{**vars(args), "max_steps": None})  # the warm start runs as its config says
    run_lorakit(WARM_CONFIG, out, plain)
    return str(out / "adapter")


def bench_grpo(args: argparse.Namespace, work: Path, peak: dict, report: dict) -> None:
    from lorakit.config import load_config

    from smollm2_arith import score

    cfg = load_config(GRPO_CONFIG)
    init = warm_start(args, work)
    flops = flop_counts(load_config(WARM_CONFIG))  # the adapter trained on is the warm start's
    per_step = cfg.grpo.prompts_per_step * cfg.rollout.num_generations
    sides = ["lorakit", "trl"] if args.peer == "trl" else ["lorakit"]
    entry: dict[str, Any] = {"config": str(GRPO_CONFIG.relative_to(ROOT)), "init_adapter": init, "model": flops,
                             "max_steps": args.max_steps, "trl_args": grpo_trl_args(cfg, "OUT", args.max_steps)}
    report["grpo"] = entry
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side in (sides if repeat % 2 == 0 else sides[::-1]):
            out = work / f"grpo-{side}-{repeat}"
            if side == "lorakit":
                result = run_lorakit(GRPO_CONFIG, out, args, [f"init_adapter={init}", "data.eval=null"])
                result["generated"] = round(sum(result.pop("completion_len")) * per_step)
            else:
                result = run_child("trl-grpo", out, args, init)
            result["adapter"] = str(out / "adapter")
            result["tokens_per_s"] = result["tokens"] / result["runtime"]
            result["rollout_tokens_per_s"] = result["generated"] / result["rollout_s"]
            result["rollout_gflop_per_s"] = (result["rollout_tokens_per_s"] * 2
                                             * (flops["matmul_params"] + flops["lora_params"]) / 1e9)
            result["rollout_of_fp32_peak"] = result["rollout_gflop_per_s"] / peak["median"]
            runs[side].append(result)
            print(f"[grpo] repeat {repeat} {side}: {result['steps']} steps, {result['tokens']:,} tokens in "
                  f"{result['runtime']:.0f}s ({result['tokens_per_s']:.0f} tokens/s), rollouts {result['rollout_s']:.0f}s "
                  f"for {result['generated']} tokens ({result['rollout_gflop_per_s']:.1f} GFLOP/s), wall "
                  f"{result['wall_s']:.0f}s, peak RSS {result['peak_rss_mb']:.0f} MB; {load()}", flush=True)
            entry["runs"] = runs
            if args.json:
                write_json(args.json, report)
    max_new = cfg.grpo.eval_max_new_tokens or cfg.rollout.max_new_tokens
    scores = score([init] + [r["adapter"] for side in sides for r in runs[side]], max_new, show=0)
    entry["base_accuracy"], entry["warm_start_accuracy"] = scores[0]["accuracy"], scores[1]["accuracy"]
    for s in scores[2:]:
        next(r for side in sides for r in runs[side] if r["adapter"] == s["adapter"])["accuracy"] = s["accuracy"]
    print(f"[grpo] held-out greedy accuracy: base {scores[0]['accuracy']:.2f}, warm start {scores[1]['accuracy']:.2f}")
    entry["summary"] = report_pairs("grpo", runs, [
        ("tokens_per_s", "trained tokens/s", ".0f"), ("runtime", "train loop s", ".0f"), ("wall_s", "wall s", ".0f"),
        ("peak_rss_mb", "peak RSS MB", ".0f"), ("rollout_tokens_per_s", "rollout tokens/s", ".0f"),
        ("rollout_gflop_per_s", "rollout GFLOP/s", ".1f"), ("rollout_of_fp32_peak", "rollout of fp32 peak", ".3f"),
        ("accuracy", "held-out accuracy", ".2f")])
    print(f"[grpo] fp32 matmul peak {peak['median']:.1f} GFLOP/s; {load()}", flush=True)
    if args.json:
        write_json(args.json, report)


def show_mapping(max_steps: Optional[int]) -> dict:
    from lorakit.config import load_config

    sft_args, lora = sft_trl_args(load_config(SFT_CONFIG), "OUT", max_steps)
    return {"sft": {"SFTConfig": sft_args, "LoraConfig": lora}, "grpo": {"GRPOConfig": grpo_trl_args(
        load_config(GRPO_CONFIG), "OUT", max_steps)}}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", nargs="?", choices=("sft", "grpo", "all", "show-mapping"), default="all")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the lorakit/TRL order alternates")
    parser.add_argument("--max-steps", type=int, default=None, help="shorten every run to N optimizer steps "
                        "(GRPO: N rollout steps); default: what the configs say")
    parser.add_argument("--init-adapter", default=None, help="GRPO's warm start (default: trained here once "
                        f"from {WARM_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--work", default=None, help="keep runs, logs and adapters here (default: a temp dir)")
    parser.add_argument("--peer", default="trl", choices=("trl", "none"), help="none: lorakit alone")
    parser.add_argument("--json", default=None, help="also write the figures here (after every run)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.side:
        return child(args)
    if args.task == "show-mapping":
        print(json.dumps(show_mapping(args.max_steps), indent=1))
        return
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if args.peer == "trl":
        import peft
        import trl

        versions.update(trl=trl.__version__, peft=peft.__version__)
    print(f"{MODEL} ({_model_dir()}), fp32 on CPU, {torch.get_num_threads()} threads; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (1024^3, median of 3): {peak['median']:.1f} GFLOP/s ({peak['min']:.1f}-{peak['max']:.1f}); "
          f"{load()}", flush=True)
    report = {"versions": versions, "fp32_peak_gflops": peak, "repeats": args.repeats, "start_load": load()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        if args.task in ("sft", "all"):
            bench_sft(args, work, peak, report)
        if args.task in ("grpo", "all"):
            bench_grpo(args, work, peak, report)
    report["end_load"] = load()
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()

"""benchmarks/real_model.py (lorakit vs TRL on SmolLM2-135M-Instruct): its arguments, and that the
shipped configs' values land on TRL's own config objects (built here by TRL, which validates them).
A run of the benchmark itself takes minutes per side on the real model: it is a benchmark, not a test."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

from lorakit.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import real_model  # noqa: E402


def test_arguments_and_their_limits():
    args = real_model.parse_args(["grpo", "--max-steps", "2", "--repeats", "1"])
    assert (args.task, args.max_steps, args.repeats, args.peer) == ("grpo", 2, 1, "trl")
    assert real_model.parse_args([]).task == "all" and real_model.parse_args([]).repeats == 3
    for bad in (["--repeats", "0"], ["--max-steps", "0"], ["fit"]):
        with pytest.raises(SystemExit):
            real_model.parse_args(bad)


def test_the_quickstart_sft_config_lands_on_trls_sft_and_lora_configs(tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig

    cfg = load_config(ROOT / "configs" / "smollm2_quickstart.yaml")
    kwargs, lora_kwargs = real_model.sft_trl_args(cfg, str(tmp_path))
    trl_args, lora = SFTConfig(**kwargs), LoraConfig(**lora_kwargs)
    tc = cfg.train
    assert (trl_args.learning_rate, trl_args.num_train_epochs, trl_args.per_device_train_batch_size,
            trl_args.gradient_accumulation_steps, trl_args.seed, trl_args.max_grad_norm) == (
        tc.lr, tc.epochs, tc.batch_size, tc.grad_accum, tc.seed, tc.max_grad_norm)
    assert trl_args.lr_scheduler_type.value == tc.lr_scheduler and trl_args.warmup_steps == tc.warmup_ratio
    # Padding-free rows, no truncation: TRL refuses max_length there (the benchmark checks the lengths).
    assert trl_args.assistant_only_loss and trl_args.padding_free and not trl_args.packing
    assert trl_args.max_length is None
    assert trl_args.use_cpu and not trl_args.bf16 and trl_args.max_steps == -1
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (
        cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, set(cfg.lora.target_modules))
    assert SFTConfig(**real_model.sft_trl_args(cfg, str(tmp_path), max_steps=3)[0]).max_steps == 3


def test_the_arith_grpo_config_lands_on_trls_grpo_config(tmp_path):
    from trl import GRPOConfig

    cfg = load_config(ROOT / "configs" / "smollm2_arith_grpo.yaml")
    trl_args = GRPOConfig(**real_model.grpo_trl_args(cfg, str(tmp_path)))
    tc, gc, rc = cfg.train, cfg.grpo, cfg.rollout
    # One rollout batch of prompts_per_step x G completions per optimizer step, as lorakit's step.
    assert trl_args.generation_batch_size == gc.prompts_per_step * rc.num_generations
    assert trl_args.num_generations == rc.num_generations and trl_args.max_steps == tc.max_steps
    assert (trl_args.learning_rate, trl_args.temperature, trl_args.max_completion_length, trl_args.beta,
            trl_args.epsilon, trl_args.epsilon_high, trl_args.seed) == (
        tc.lr, rc.temperature, rc.max_new_tokens, gc.beta, gc.clip_eps_low, gc.clip_eps_high, tc.seed)
    assert (trl_args.loss_type, trl_args.scale_rewards, trl_args.shuffle_dataset) == ("dapo", "group", False)

    # Other lorakit settings move TRL's accordingly (a config the lead retunes is read, not assumed).
    changed = load_config(ROOT / "configs" / "smollm2_arith_grpo.yaml", [
        "grpo.loss_aggregation=sequence", "grpo.scale_rewards=false", "grpo.mini_batches=2", "grpo.num_iterations=2",
        "train.batch_size=8", "train.max_steps=5", "train.lr_scheduler=constant", "train.warmup_ratio=0.1",
        "grpo.beta=0.04", "grpo.mask_truncated=true"])
    trl_args = GRPOConfig(**real_model.grpo_trl_args(changed, str(tmp_path)))
    completions = changed.grpo.prompts_per_step * changed.rollout.num_generations
    assert (trl_args.loss_type, trl_args.scale_rewards, trl_args.beta, trl_args.mask_truncated_completions) == (
        "grpo", "none", 0.04, True)
    assert trl_args.per_device_train_batch_size == 8 and trl_args.generation_batch_size == completions
    assert trl_args.gradient_accumulation_steps == completions // (2 * 8)  # 2 optimizer steps per rollout batch
    assert trl_args.max_steps == 5 * 2 * 2  # rollout steps x mini-batches x iterations
    assert trl_args.lr_scheduler_type.value == "constant_with_warmup"
    with pytest.raises(SystemExit, match="not a multiple"):
        real_model.grpo_trl_args(load_config(ROOT / "configs" / "smollm2_arith_grpo.yaml", ["train.batch_size=24"]), "x")


def test_the_reward_is_lorakits_numeric_match_as_a_trl_reward_function():
    cfg = load_config(ROOT / "configs" / "smollm2_arith_grpo.yaml")
    (reward,) = real_model.trl_reward_functions(cfg)
    prompts = [[{"role": "user", "content": "What is 47 + 38?"}]] * 3
    completions = [[{"role": "assistant", "content": text}] for text in ("47 + 38 = 85.", "It is 84.", "eighty-five")]
    assert reward(prompts, completions, answer=["85", "85", "85"], completion_ids=[[1], [2], [3]]) == [1.0, 0.0, 0.0]


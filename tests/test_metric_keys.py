"""The keys of every record each recipe writes to metrics.jsonl, against explicit lists.

A key that silently disappears (once an inline comment swallowed SFT's ``tokens``) or appears
unannounced fails here; README's metric tables and the plots read these names.
"""

import json
from pathlib import Path

import pytest

from lorakit.config import load_config

ROOT = Path(__file__).resolve().parents[1]

SFT_STEP = {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
SFT_EVAL = {"step", "eval_loss"}
SFT_SUMMARY = {"step", "train_runtime", "train_tokens"}

GRPO_STEP = {"step", "epoch", "reward_mean", "reward_std", "reward/numeric_match", "zero_std_frac", "completion_len",
             "truncated_frac", "aborted_frac", "skipped_frac", "clip_frac", "clip_low_frac", "clip_high_frac", "loss", "lr", "grad_norm",
             "tokens_per_s", "rollout_s", "step_s",
             "sync_s", "policy_version", "staleness",  # the rollout backend's sync, and which policy sampled
             "accuracy",       # numeric_match defines correctness
             "kl",             # grpo.log_kl
             "logprob_gap"}    # temperature 1, one update per rollout batch: trainer vs sampler log-probs
GRPO_EVAL = {"step", "eval_accuracy"}
GRPO_SUMMARY = {"step", "train_runtime"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from lorakit.models import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _write(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def test_sft_metric_keys(tmp_path, demo):
    from lorakit.recipes.sft import run

    data = str(ROOT / "examples" / "data" / "identity.jsonl")
    cfg = load_config(_write(tmp_path, {
        "model": str(demo), "output_dir": str(tmp_path / "run"), "data": {"train": data, "eval": data},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 8, "max_seq_len": 64, "eval_steps": 1, "logging_steps": 1}}))
    run(cfg, log=lambda _: None)
    records = _records(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    summaries = [r for r in records if "train_runtime" in r]
    assert len(steps) + len(evals) + len(summaries) == len(records)
    assert [r["step"] for r in steps] == [1, 2] and [r["step"] for r in evals] == [1, 2, 2]
    for record in steps:
        assert set(record) == SFT_STEP, sorted(set(record) ^ SFT_STEP)
    for record in evals:
        assert set(record) == SFT_EVAL
    assert [set(r) for r in summaries] == [SFT_SUMMARY]
    # tokens counts every (non-padding) token trained on so far, over all steps
    assert 0 < steps[0]["tokens"] < steps[1]["tokens"] == summaries[0]["train_tokens"]


def test_grpo_metric_keys(tmp_path, demo):
    from lorakit.recipes.grpo import run

    held_out = tmp_path / "eval.jsonl"  # a few held-out prompts: the keys, not the score, are tested
    held_out.write_text("".join((ROOT / "examples" / "data" / "arith_eval.jsonl").read_text().splitlines(True)[:4]))
    cfg = load_config(_write(tmp_path, {
        "recipe": "grpo", "model": str(demo), "output_dir": str(tmp_path / "run"),
        "data": {"train": str(ROOT / "examples" / "data" / "arith_rl.jsonl"),
                 "eval": str(held_out)},
        "lora": {"r": 4, "alpha": 8},
        "grpo": {"prompts_per_step": 2, "log_kl": True, "eval_max_new_tokens": 2},
        "rollout": {"num_generations": 2, "max_new_tokens": 3},
        "train": {"max_steps": 2, "batch_size": 4, "eval_steps": 1, "logging_steps": 1}}))
    run(cfg, log=lambda _: None)
    records = _records(tmp_path / "run")
    steps = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    summaries = [r for r in records if "train_runtime" in r]
    assert len(steps) + len(evals) + len(summaries) == len(records)
    assert [r["step"] for r in steps] == [1, 2] and [r["step"] for r in evals] == [0, 1, 2]
    for record in steps:
        assert set(record) == GRPO_STEP, sorted(set(record) ^ GRPO_STEP)
    for record in evals:
        assert set(record) == GRPO_EVAL
    assert [set(r) for r in summaries] == [GRPO_SUMMARY]

"""One short GRPO run's config and its per-step metrics, for the rollout-backend tests (server, vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def grpo_config(tmp_path: Path, model: Path, name: str, rollout: dict, steps: int = 3, r: int = 4):
    """A 2-prompt x 4-completion GRPO run of ``model`` into tmp_path/name, rewarded by a signal any
    policy can move (odd completion lengths); ``rollout`` holds the backend's keys."""
    body = {"recipe": "grpo", "model": str(model), "output_dir": str(tmp_path / name),
            "data": {"train": str(ROOT / "examples" / "data" / "arith_rl.jsonl")},
            "lora": {"r": r, "alpha": 8},
            "grpo": {"prompts_per_step": 2, "rewards": {"tests.rl.rewards_for_tests:odd_chars": 1.0}},
            "rollout": {"num_generations": 4, **rollout},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 5e-2, "seed": 3}}
    (tmp_path / f"{name}.yaml").write_text(json.dumps(body))
    return load_config(tmp_path / f"{name}.yaml")


def reward_steps(out: Path) -> list[dict]:
    """The per-step GRPO records of a run's metrics.jsonl (those carrying ``reward_mean``)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "reward_mean" in r]

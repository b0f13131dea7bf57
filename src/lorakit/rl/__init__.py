"""RL pieces: verifiable rewards, GRPO's advantages and loss (pure functions), rollout engines."""

from .grpo import LossStats, group_advantages, grpo_loss, kl_k3, token_weights
from .rewards import (BUILTIN_REWARDS, RewardScore, RewardSet, answer_format, countdown, extract_number,
                      numeric_match, resolve_reward)
from .rollout import LocalRollout, RolloutServerError, Sample, ServerRollout

__all__ = [
    "LossStats", "group_advantages", "grpo_loss", "kl_k3", "token_weights", "BUILTIN_REWARDS", "RewardScore",
    "RewardSet", "answer_format", "countdown", "extract_number", "numeric_match", "resolve_reward", "LocalRollout",
    "RolloutServerError", "Sample", "ServerRollout",
]

"""RL pieces: verifiable rewards, GRPO's advantages and loss (pure functions), rollout backends, and the
trainer's side of the policy (objective, reference, completion batches, held-out evaluation)."""

from .batches import CompletionBatches, completion_rows, logprob_gap, sequences_to_train
from .evaluate import HeldOutEval
from .grpo import LossStats, group_advantages, grpo_loss, kl_k3, token_weights, trained_completions
from .policy import GRPOObjective, adapter_weights, completion_logprobs, reference_policy
from .rewards import (BUILTIN_REWARDS, RewardScore, RewardSet, answer_format, countdown, extract_number,
                      numeric_match, resolve_reward)
from .rollout import (LocalRollout, PolicySampler, PolicyUpdate, RolloutBackend, RolloutBatch, RolloutCompletion,
                      RolloutEngine, RolloutServerError, ServerRollout, StaleRolloutError, adapter_fingerprint)

__all__ = [
    "CompletionBatches", "completion_rows", "logprob_gap", "sequences_to_train", "HeldOutEval", "LossStats", "group_advantages", "grpo_loss",
    "kl_k3", "token_weights", "trained_completions", "GRPOObjective", "adapter_weights", "completion_logprobs",
    "reference_policy", "BUILTIN_REWARDS",
    "RewardScore", "RewardSet", "answer_format", "countdown", "extract_number", "numeric_match", "resolve_reward",
    "LocalRollout", "PolicySampler", "PolicyUpdate", "RolloutBatch", "RolloutBackend", "RolloutCompletion", "RolloutEngine",
    "RolloutServerError", "ServerRollout", "StaleRolloutError", "adapter_fingerprint",
]

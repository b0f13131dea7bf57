"""Held-out evaluation for RL: greedy completions of held-out prompts, scored by the run's rewards."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..data import PromptRecord
from ..distributed import DistInfo, all_reduce_sum
from ..generation import SamplingParams
from .rewards import RewardSet
from .rollout import RolloutCompletion

Sampler = Callable[[Sequence[list[int]], Sequence[SamplingParams]], list[RolloutCompletion]]


class HeldOutEval:
    """Accuracy on held-out prompts when a reward defines it (else the mean total reward).

    Each rank completes its strided share of the prompts (``rank, rank + world, ...``) greedily, and
    the score is summed over all ranks, then divided by the number of prompts.

    Args:
        records: the held-out prompt records (their fields feed the rewards).
        prompt_ids: their token ids, ``prompt_ids[i]`` for ``records[i]``.
        rewards: the run's rewards.
        max_new_tokens: the greedy completions' length limit.
        info, device: this rank, and where its collectives run.
    """

    def __init__(self, records: Sequence[PromptRecord], prompt_ids: Sequence[list[int]], rewards: RewardSet,
                 max_new_tokens: int, info: Optional[DistInfo] = None, device: torch.device = torch.device("cpu")) -> None:
        if len(records) != len(prompt_ids):
            raise ValueError(f"{len(records)} records for {len(prompt_ids)} prompts")
        self.records, self.prompt_ids, self.rewards = records, prompt_ids, rewards
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.info, self.device = info or DistInfo(), device
        self.key = "eval_accuracy" if rewards.accuracy else "eval_reward"
        """The metric's name in metrics.jsonl."""

    @property
    def what(self) -> str:
        """'accuracy' or 'reward', for log lines."""
        return self.key.split("_")[1]

    def __call__(self, sample: Sampler) -> float:
        """The score of ``sample``'s greedy completions (every rank calls it: a collective)."""
        mine = list(range(self.info.rank, len(self.records), self.info.world))
        # Called even with no prompts: a sharded local backend's forwards are collectives, so a rank
        # without a share of the prompts still joins the others' batches.
        done = sample([self.prompt_ids[i] for i in mine], [self.params] * len(mine))
        scored = self.rewards.score([self.records[i].prompt for i in mine], [d.text for d in done],
                                    [self.records[i].fields for i in mine])
        local = sum(map(float, scored.correct)) if scored.correct is not None else sum(scored.total)
        return all_reduce_sum(local, self.info, self.device) / len(self.records)

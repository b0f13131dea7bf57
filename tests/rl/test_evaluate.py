"""Held-out evaluation: greedy requests for this rank's share, scores checked against hand counts."""

import pytest

from lorakit.data import PromptRecord
from lorakit.distributed import DistInfo
from lorakit.rl import HeldOutEval, RewardSet, RolloutCompletion

ANSWERS = [2, 5, 9, 4, 7]
RECORDS = [PromptRecord(f"e.jsonl:{i + 1}", f"q{i}", None, {"answer": a}) for i, a in enumerate(ANSWERS)]
IDS = [[10 + i] for i in range(len(RECORDS))]
TEXTS = {10: "2", 11: "6", 12: "so 9", 13: "four", 14: "7"}  # right: prompts 0, 2, 4


class Recorder:
    """A sampler that answers each prompt with a fixed text and records what it was asked."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, params):
        self.calls.append((list(prompts), list(params)))
        return [RolloutCompletion([1], TEXTS[p[0]], None, "stop") for p in prompts]


def test_accuracy_over_all_prompts_from_greedy_completions():
    evaluate = HeldOutEval(RECORDS, IDS, RewardSet({"numeric_match": 1.0, "answer_format": 0.5}), max_new_tokens=7)
    sampler = Recorder()
    assert evaluate(sampler) == pytest.approx(3 / 5)
    assert (evaluate.key, evaluate.what) == ("eval_accuracy", "accuracy")
    (prompts, params), = sampler.calls
    assert prompts == IDS
    assert all(p.temperature == 0.0 and p.max_new_tokens == 7 for p in params)


def test_mean_reward_when_no_reward_defines_accuracy():
    evaluate = HeldOutEval(RECORDS, IDS, RewardSet({"tests.rl.rewards_for_tests:odd_chars": 2.0}), max_new_tokens=3)
    # odd code points: "2" 0, "6" 0, "so 9" 3 (s, o, 9), "four" 2 (o, u), "7" 1 -> 2 * 6 / 5
    assert evaluate(Recorder()) == pytest.approx(12 / 5)
    assert (evaluate.key, evaluate.what) == ("eval_reward", "reward")


def test_each_rank_completes_its_strided_share():
    # Without a process group the sum stays local: rank 1 of 2 scores prompts 1 and 3 (both wrong)
    # and rank 0 prompts 0, 2, 4 (all right), each over the 5 prompts of the whole set.
    rewards = RewardSet({"numeric_match": 1.0})
    scores = []
    for rank in (0, 1):
        sampler = Recorder()
        scores.append(HeldOutEval(RECORDS, IDS, rewards, 4, DistInfo(rank=rank, world=2))(sampler))
        assert sampler.calls[0][0] == IDS[rank::2]
    assert scores == [pytest.approx(3 / 5), 0.0]
    few = Recorder()
    assert HeldOutEval(RECORDS[:1], IDS[:1], rewards, 4, DistInfo(rank=1, world=2))(few) == 0.0
    assert few.calls == [([], [])]  # a rank with no share still calls: a sharded engine's forwards are collectives

"""Batches of prompt + completion: layouts against hand-built tensors, log-prob order against a plain forward."""

import pytest
import torch

from lorakit.data import IGNORE
from lorakit.lora import LoraConfig, inject_lora
from lorakit.rl import CompletionBatches, RolloutCompletion, logprob_gap
from lorakit.training import token_logprobs

from ..models import randomize_lora, tiny_qwen3

PAD = 0


def _done(ids, logprobs=None):
    return RolloutCompletion(ids, "", logprobs, "stop")


PROMPTS = [[1, 2], [3], [10, 11, 12]]
COMPLETIONS = [_done([4, 5, 6]), _done([7]), _done([8, 9])]


def test_padded_micro_batches_label_only_the_completion():
    batches = CompletionBatches(PROMPTS, COMPLETIONS, batch_size=2, pad_id=PAD, padding_free=False)
    assert batches.lengths.tolist() == [3.0, 1.0, 2.0]
    first, second = list(batches.micro_batches())
    assert first["input_ids"].tolist() == [[1, 2, 4, 5, 6], [3, 7, PAD, PAD, PAD]]
    assert first["labels"].tolist() == [[IGNORE, IGNORE, 4, 5, 6], [IGNORE, 7, IGNORE, IGNORE, IGNORE]]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert "position_ids" not in first
    assert second["input_ids"].tolist() == [[10, 11, 12, 8, 9]]
    assert second["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 8, 9]]


def test_padding_free_micro_batches_restart_positions_per_sequence():
    batches = CompletionBatches(PROMPTS, COMPLETIONS, batch_size=2, pad_id=PAD, padding_free=True)
    first = next(batches.micro_batches([2, 0]))
    assert first["input_ids"].tolist() == [[10, 11, 12, 8, 9, 1, 2, 4, 5, 6]]
    assert first["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 8, 9, IGNORE, IGNORE, 4, 5, 6]]
    assert first["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    assert "attention_mask" not in first


def test_per_token_values_follow_their_sequences():
    # Tokens in sequence order: seq 0 -> values 0, 1, 2; seq 1 -> 3; seq 2 -> 4, 5.
    values = torch.arange(6.0)
    batches = CompletionBatches(PROMPTS, COMPLETIONS, batch_size=2, pad_id=PAD, padding_free=False)
    got = [b["adv"].tolist() for b in batches.micro_batches([2, 0, 1], {"adv": values})]
    assert got == [[4.0, 5.0, 0.0, 1.0, 2.0], [3.0]]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        CompletionBatches(PROMPTS[:2], COMPLETIONS, 2, PAD, False)


@pytest.mark.parametrize("padding_free", [False, True])
def test_batched_logprobs_come_in_sequence_order(padding_free):
    # Oracle: each sequence alone through the plain HF forward, log-softmax of its completion tokens.
    model = tiny_qwen3(seed=2)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=3, scale=0.3)
    order = [1, 2, 0]
    expected = []
    with torch.no_grad():
        for i in order:
            ids = torch.tensor([PROMPTS[i] + COMPLETIONS[i].token_ids])
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            p = len(PROMPTS[i])
            expected += [logp[p - 1 + t, tok].item() for t, tok in enumerate(COMPLETIONS[i].token_ids)]
        batches = CompletionBatches(PROMPTS, COMPLETIONS, batch_size=2, pad_id=PAD, padding_free=padding_free)
        got = torch.cat([token_logprobs(model, b) for b in batches.micro_batches(order)])
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_logprob_gap_skips_completions_without_sampler_logprobs():
    completions = [_done([4, 5], [-1.0, -2.0]), _done([6]), _done([7, 8, 9], [-0.5, -0.5, -0.5])]
    trainer = torch.tensor([-1.5, -2.0, -9.0, -0.5, -0.25, -1.0])  # sequences 0, 1, 2 in that order
    # |(-1.5) - (-1)| + 0 + (skip seq 1) + 0 + 0.25 + 0.5
    assert logprob_gap(trainer, [0, 1, 2], completions) == pytest.approx(1.25)
    assert logprob_gap(torch.tensor([-0.5, -0.5, -0.5, -1.0, -2.0]), [2, 0], completions) == 0.0

"""GRPO's pure functions against values worked out by hand."""

import math

import pytest
import torch

from lorakit.rl import group_advantages, grpo_loss, kl_k3, token_weights


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0])  # groups of 3: [1,0,0] and [0,2,2]
    adv, zero = group_advantages(rewards, 3)
    # group 1: mean 1/3, Bessel std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    std1 = math.sqrt(1 / 3)
    std2 = math.sqrt(((4 / 3) ** 2 + 2 * (2 / 3) ** 2) / 2)
    want = [(2 / 3) / (std1 + 1e-4), (-1 / 3) / (std1 + 1e-4), (-1 / 3) / (std1 + 1e-4),
            (-4 / 3) / (std2 + 1e-4), (2 / 3) / (std2 + 1e-4), (2 / 3) / (std2 + 1e-4)]
    assert adv.tolist() == pytest.approx(want, rel=1e-6)
    assert zero.tolist() == [False, False]
    plain, _ = group_advantages(rewards, 3, scale=False)
    assert plain.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -4 / 3, 2 / 3, 2 / 3], rel=1e-6)


def test_all_equal_groups_get_zero_advantage_and_are_counted():
    adv, zero = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2)
    assert adv[:2].tolist() == [0.0, 0.0] and adv[4:].tolist() == [0.0, 0.0]
    assert zero.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_token_and_sequence_aggregation_weights():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    tok = token_weights(mask, "token", num_tokens=4, num_sequences=2)
    assert tok.tolist() == [[0.25, 0.25, 0.25], [0.25, 0.0, 0.0]]
    seq = token_weights(mask, "sequence", num_tokens=4, num_sequences=2)
    assert seq.flatten().tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0.5, 0.0, 0.0])
    # Totals larger than this micro-batch (other micro-batches / ranks) scale the weights down.
    assert token_weights(mask, "token", 8, 4).sum().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        token_weights(mask, "mean", 4, 2)


def test_clipping_on_both_sides_by_hand():
    # Four tokens, one per completion: ratio 1.5 / 0.5 against advantage +1 / -1.
    ratio = torch.tensor([[1.5], [0.5], [1.5], [0.5]])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    old = torch.zeros(4, 1)
    logp = torch.log(ratio).requires_grad_(True)
    weights = torch.full((4, 1), 0.25)
    loss, stats = grpo_loss(logp, old, adv, weights, clip_low=0.2, clip_high=0.2)
    # per token: -min(r A, clip(r) A) = [-1.2, 0.8, 1.5, -0.5]
    assert loss.item() == pytest.approx(0.25 * (-1.2 + 0.8 + 1.5 - 0.5), rel=1e-6)
    assert (stats.clipped, stats.clipped_high, stats.clipped_low, stats.tokens) == (2.0, 1.0, 1.0, 4.0)
    loss.backward()
    # d/dlogp of -r A w = -r A w where unclipped; zero where the clipped branch won.
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 0.0, 0.25 * 1.5, -0.25 * 0.5], abs=1e-7)


def test_asymmetric_clip_higher():
    logp = torch.log(torch.tensor([[1.25]]))
    loss, stats = grpo_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2,
                            clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and stats.clipped == 0.0  # inside [0.8, 1.28]
    loss, stats = grpo_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), 0.2, 0.2)
    assert loss.item() == pytest.approx(-1.2) and stats.clipped_high == 1.0


def test_kl_k3_and_the_penalty():
    assert kl_k3(torch.tensor([-0.3]), torch.tensor([-0.3])).item() == 0.0
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    logp2 = torch.log(torch.tensor([[0.5]]))
    loss, stats = grpo_loss(logp2, logp2, torch.tensor([0.0]), torch.ones(1, 1), ref_logp=torch.log(torch.tensor([[0.25]])),
                            beta=0.1)
    assert loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1), rel=1e-6)
    assert stats.kl == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp2, logp2, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1)


def test_padding_carries_no_loss_and_per_token_advantages_work():
    logp = torch.tensor([[-1.0, -2.0, 5.0]], requires_grad=True)  # the last position is padding
    weights = token_weights(torch.tensor([[1, 1, 0]]), "token", 2, 1)
    loss, stats = grpo_loss(logp, logp.detach(), torch.tensor([2.0]), weights)
    assert loss.item() == pytest.approx(-2.0) and stats.tokens == 2.0
    flat, _ = grpo_loss(logp[0, :2], logp[0, :2].detach(), torch.tensor([2.0, 2.0]), weights[0, :2])
    assert flat.item() == pytest.approx(loss.item())
    loss.backward()
    assert logp.grad[0, 2].item() == 0.0

"""The trainer's side of the policy: GRPO objective, no-grad log-prob passes, and the reference policy."""

import copy

import pytest
import torch

from lorakit.distributed import LossModule
from lorakit.lora import LoraConfig, inject_lora, set_active_adapters
from lorakit.rl import CompletionBatches, GRPOObjective, RolloutCompletion, completion_logprobs, reference_policy
from lorakit.training import token_logprobs

from ..models import randomize_lora, tiny_qwen3

PROMPTS = [[1, 2, 3], [4, 5]]
COMPLETIONS = [RolloutCompletion([6, 7], "", None, "stop"), RolloutCompletion([8, 9, 10], "", None, "length")]


def _policy(seed=0):
    model = tiny_qwen3(seed=seed)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(model, seed=seed + 1, scale=0.3)
    return model


def _batch():
    return next(CompletionBatches(PROMPTS, COMPLETIONS, batch_size=2, pad_id=0, padding_free=False).micro_batches())


def test_without_advantages_the_objective_gives_logprobs():
    model, objective = _policy(), GRPOObjective(temperature=0.7)
    with torch.no_grad():
        logp, n = objective(model, _batch())
        assert n == 5
        assert torch.equal(logp, token_logprobs(model, _batch(), 0.7))
    assert objective.stats is None  # a log-prob pass leaves no training statistics


def test_on_policy_loss_is_minus_the_weighted_advantage():
    # At the first update old_logp is the policy's own: ratio 1, nothing clipped, loss = -sum(w * A).
    model, objective = _policy(), GRPOObjective(clip_low=0.2, clip_high=0.2)
    batch = _batch()
    advantages = torch.tensor([1.0, 1.0, -0.5, -0.5, -0.5])
    weights = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    loss, n = objective(model, {**batch, "advantages": advantages, "weights": weights})
    assert n == 5
    assert loss.item() == pytest.approx(-(0.2 * 1.0 * 2 - 0.2 * 0.5 * 3))  # -0.1
    assert objective.stats.tokens == 5 and objective.stats.clipped == 0 and objective.stats.kl == 0
    assert torch.equal(objective.logp, token_logprobs(model, batch).detach())
    loss.backward()  # the gradient reaches the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_off_policy_tokens_outside_the_trust_region_are_clipped():
    model, objective = _policy(), GRPOObjective(clip_low=0.2, clip_high=0.2, beta=0.0)
    batch = _batch()
    with torch.no_grad():
        logp = token_logprobs(model, batch)
    # old log-probs 1.0 lower on token 0 (ratio e > 1.2, A > 0: clipped high), 1.0 higher on token 3
    # (ratio 1/e < 0.8, A < 0: clipped low); the rest on-policy.
    old = logp.clone()
    old[0] -= 1.0
    old[3] += 1.0
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0])
    objective(model, {**batch, "advantages": advantages, "weights": torch.full((5,), 0.2), "old_logp": old})
    assert (objective.stats.clipped_high, objective.stats.clipped_low, objective.stats.clipped) == (1, 1, 2)


def test_completion_logprobs_concatenates_batches_without_grad():
    model = _policy()
    step_module = LossModule(model, GRPOObjective())
    batches = CompletionBatches(PROMPTS, COMPLETIONS, batch_size=1, pad_id=0, padding_free=False)
    got = completion_logprobs(step_module, batches.micro_batches([1, 0]))
    with torch.no_grad():
        want = torch.cat([token_logprobs(model, b) for b in batches.micro_batches([1, 0])])
    assert not got.requires_grad and got.dtype == torch.float32 and got.shape == (5,)
    assert torch.equal(got, want)
    assert completion_logprobs(step_module, []).shape == (0,)


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits


def test_reference_is_the_base_or_a_frozen_adapter_and_the_policy_comes_back():
    base = tiny_qwen3(seed=0)
    frozen = copy.deepcopy(base)
    inject_lora(frozen, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="reference")
    randomize_lora(frozen, seed=7, scale=0.3)
    # The policy: the same base with a trained adapter and the frozen reference adapter beside it.
    model = copy.deepcopy(frozen)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                adapter_name="default")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and ".default" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    set_active_adapters(model, ["default"])
    policy = _logits(model)
    assert not torch.allclose(policy, _logits(base)) and not torch.allclose(policy, _logits(frozen))

    with reference_policy(model, None, "default"):
        assert torch.allclose(_logits(model), _logits(base), atol=1e-6)
    assert torch.equal(_logits(model), policy)
    with reference_policy(model, "reference", "default"):
        assert torch.allclose(_logits(model), _logits(frozen), atol=1e-6)
    assert torch.equal(_logits(model), policy)
    with pytest.raises(RuntimeError, match="boom"):
        with reference_policy(model, "reference", "default"):
            raise RuntimeError("boom")
    assert torch.equal(_logits(model), policy)  # the policy is back even after an error

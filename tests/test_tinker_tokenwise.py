"""The training piece under the Tinker API (``lorakit.training.tokenwise``), without the SDK: the
losses against hand values, one mixed-adapter forward/backward against each request alone, the
per-adapter AdamW against torch's, and the input checks."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit import LoraConfig, inject_lora
from lorakit.training.jobs import adapter_parameters
from lorakit.training.tokenwise import (AdamStep, AdapterOptimizer, LossRequest, TokenDatum, check_datum, check_loss,
                                        forward_backward, token_loss)

from .models import randomize_lora, tiny_qwen3


def test_losses_by_hand():
    lp = torch.log(torch.tensor([0.5, 0.25]))
    assert float(token_loss("cross_entropy", lp, {"weights": torch.tensor([1.0, -2.0])}, {})) == pytest.approx(
        -(math.log(0.5) - 2 * math.log(0.25)))
    old = torch.log(torch.tensor([0.25, 0.5]))  # ratios 2 and 0.5
    adv = torch.tensor([1.0, -1.0])
    inputs = {"logprobs": old, "advantages": adv}
    assert float(token_loss("importance_sampling", lp, inputs, {})) == pytest.approx(-(2 * 1 + 0.5 * -1))
    # PPO: min(r A, clip(r) A): token 0 -> min(2, 1.2) = 1.2; token 1 -> min(-0.5, -0.8) = -0.8
    assert float(token_loss("ppo", lp, inputs, {})) == pytest.approx(-(1.2 - 0.8))
    assert float(token_loss("ppo", lp, inputs, {"clip_low_threshold": 0.4, "clip_high_threshold": 3.0})) == \
        pytest.approx(-(2 - 0.5))


def _model():
    model = tiny_qwen3(seed=0)
    for k in range(2):
        torch.manual_seed(k)
        inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), adapter_name=f"a{k}")
    randomize_lora(model, seed=1)
    return model


def _datum(seed: int, n: int, loss: str = "cross_entropy") -> TokenDatum:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 128, (n,), generator=g).tolist()
    inputs = {"target_tokens": torch.randint(1, 128, (n,), generator=g)}
    if loss == "cross_entropy":
        inputs["weights"] = torch.rand(n, generator=g) - 0.2
    else:
        inputs["logprobs"] = -torch.rand(n, generator=g) * 5
        inputs["advantages"] = torch.randn(n, generator=g)
    return TokenDatum(tokens, inputs)


def _grads(model, requests, **options):
    for p in model.parameters():
        p.grad = None
    results = forward_backward(model, requests, pad_id=0, **options)
    return results, {k: [p.grad.clone() for p in adapter_parameters(model, k)] for k in ("a0", "a1")
                     if all(p.grad is not None for p in adapter_parameters(model, k))}


def test_mixed_step_gives_each_adapter_its_own_gradient():
    model = _model()
    r0 = LossRequest("a0", [_datum(0, 9), _datum(1, 4)], "cross_entropy")
    r1 = LossRequest("a1", [_datum(2, 13, "ppo")], "ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5})
    alone0, g0 = _grads(model, [r0])
    alone1, g1 = _grads(model, [r1])
    assert "a1" not in g0 and "a0" not in g1  # a request touches only its own adapter
    mixed, gm = _grads(model, [r0, r1])
    for k, alone in (("a0", g0), ("a1", g1)):
        for a, b in zip(alone[k], gm[k]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for got, want in zip(mixed, alone0 + alone1):
        assert got.loss == pytest.approx(want.loss, rel=1e-6)
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(got.logprobs, want.logprobs))
    # the log-probs are the model's own: position i of a row predicts its target i
    datum = r0.data[0]
    from lorakit.lora import route_adapters

    with torch.no_grad(), route_adapters(model, ["a0"]):
        logits = model(input_ids=torch.tensor([datum.tokens])).logits[0]
    expected = torch.log_softmax(logits, -1).gather(1, datum.inputs["target_tokens"][:, None])[:, 0]
    assert torch.allclose(mixed[0].logprobs[0], expected, atol=1e-5)


def test_interleaved_requests_run_as_one_block_per_adapter_with_results_in_the_callers_order():
    """Requests of two adapters arriving interleaved (a0, a1, a0, a1: how several Tinker clients'
    steps come in) run with each adapter's rows in one block: the LoRA layers see spans (views, no
    gather/scatter). The oracle is the same batch in the callers' order (routed row by row)."""
    from lorakit.lora import lora_modules

    model = _model()
    requests = [LossRequest("a0", [_datum(10, 6)], "cross_entropy"),
                LossRequest("a1", [_datum(11, 8), _datum(12, 3)], "cross_entropy"),
                LossRequest("a0", [_datum(13, 5, "ppo")], "ppo"),
                LossRequest("a1", [_datum(14, 7, "importance_sampling")], "importance_sampling")]
    layouts = []
    layer = next(m for _, m in lora_modules(model))
    layer.register_forward_pre_hook(lambda m, args: layouts.append(m.row_routes.spans))
    grouped, grouped_grads = _grads(model, requests)
    assert layouts == [(("a0", 0, 2), ("a1", 2, 5))]  # rows 0-1: requests 0 and 2; rows 2-4: requests 1 and 3
    ungrouped, ungrouped_grads = _grads(model, requests, group=False)
    assert layouts[1] is None  # a0, a1, a1, a0, a1: no block per adapter, rows gathered per adapter
    for got, want in zip(grouped, ungrouped):
        assert got.loss == pytest.approx(want.loss, rel=1e-6)
        assert [x.shape for x in got.logprobs] == [y.shape for y in want.logprobs]
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(got.logprobs, want.logprobs))
    for name in ("a0", "a1"):
        for a, b in zip(grouped_grads[name], ungrouped_grads[name]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_add_up_until_the_adapters_own_adamw_step():
    model = _model()
    a, b = LossRequest("a0", [_datum(3, 7)], "cross_entropy"), LossRequest("a0", [_datum(4, 5)], "cross_entropy")
    params = adapter_parameters(model, "a0")
    start = [p.detach().clone() for p in params]
    for p in model.parameters():
        p.grad = None
    forward_backward(model, [a], 0)
    forward_backward(model, [b], 0)
    summed = [p.grad.clone() for p in params]
    other = [p.detach().clone() for p in adapter_parameters(model, "a1")]
    hp = AdamStep(learning_rate=0.1, beta1=0.7, beta2=0.8, eps=1e-3, weight_decay=0.05, grad_clip_norm=0.3)
    AdapterOptimizer(model, "a0").step(hp)
    # torch's AdamW on copies, from the same gradient, clipped the same way
    copies = [s.clone().requires_grad_(True) for s in start]
    for c, g in zip(copies, summed):
        c.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(copies, 0.3)
    torch.optim.AdamW(copies, lr=0.1, betas=(0.7, 0.8), eps=1e-3, weight_decay=0.05).step()
    assert all(torch.allclose(p, c, atol=1e-6) for p, c in zip(params, copies))
    assert all(torch.equal(p, o) for p, o in zip(adapter_parameters(model, "a1"), other))
    assert all(p.grad is None for p in params)


def test_input_checks_name_the_datum_and_key():
    ok = _datum(0, 5)
    check_datum(ok, "cross_entropy", 128, "data[0]")
    with pytest.raises(ValueError, match=r"data\[3\]: model_input holds token id 500, outside the vocabulary"):
        check_datum(TokenDatum([1, 500], {"target_tokens": torch.tensor([1, 2]), "weights": torch.ones(2)}),
                    "cross_entropy", 128, "data[3]")
    with pytest.raises(ValueError, match=r"loss_fn_inputs\['weights'\] has shape \[4\]; it must be \[5\]"):
        check_datum(TokenDatum(ok.tokens, {**ok.inputs, "weights": torch.ones(4)}), "cross_entropy", 128, "data[0]")
    with pytest.raises(ValueError, match="lacks 'logprobs', which 'importance_sampling' needs"):
        check_datum(ok, "importance_sampling", 128, "data[0]")
    with pytest.raises(ValueError, match="target_tokens holds an id outside"):
        check_datum(TokenDatum([1, 2], {"target_tokens": torch.tensor([1, 128]), "weights": torch.ones(2)}),
                    "cross_entropy", 128, "d")
    with pytest.raises(ValueError, match="unknown loss_fn 'dpo'"):
        check_loss("dpo", {})
    with pytest.raises(ValueError, match="not understood by 'cross_entropy'"):
        check_loss("cross_entropy", {"clip_low_threshold": 0.9})
    with pytest.raises(ValueError, match="0 <= low <= 1 <= high"):
        check_loss("ppo", {"clip_low_threshold": 1.1})

"""``disable_adapters`` on merged models: the weights are never rewritten, the output is the base's.

The oracle is the base model itself (a deep copy taken before any LoRA was injected), never
lorakit's own merge/unmerge arithmetic.
"""

import copy

import torch
from torch import nn

from lorakit import LoraConfig, disable_adapters, inject_lora, merge_lora, set_active_adapters
from lorakit.lora import LoraLayer

from ..models import randomize_lora, tiny_gpt2, tiny_qwen3


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"weights changed: {changed[:5]}"


def _merged_bf16_qwen(ids):
    model = tiny_qwen3().to(torch.bfloat16)
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model, scale=0.2)
    with torch.no_grad():
        adapted = model(ids).logits
    merge_lora(model)
    return model, base, adapted


def test_bf16_weights_are_bit_identical_after_many_disable_enable_cycles(ids):
    model, _, _ = _merged_bf16_qwen(ids)
    before = _state(model)
    with torch.no_grad():
        merged_out = model(ids).logits
        for _ in range(10):
            with disable_adapters(model):
                model(ids)
    _assert_bit_identical(model, before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, merged_out)
    assert all(m.merged_adapters == ["default"] for m in model.modules() if isinstance(m, LoraLayer))


def test_bf16_adapters_merged_in_two_calls_survive_disable_enable_bit_for_bit(ids):
    # Two merges round twice; an unmerge/re-merge of both at once would round once (and in
    # another order): the weights would change. Disabling must not rewrite them at all.
    for dtype in (torch.bfloat16, torch.float32):
        model = tiny_qwen3().to(dtype)
        base = copy.deepcopy(model)
        for name in ("a", "b"):
            inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), adapter_name=name)
        randomize_lora(model, scale=0.2)
        merge_lora(model, ["b"])
        merge_lora(model, ["a"])
        before = _state(model)
        with torch.no_grad():
            merged_out = model(ids).logits
            for _ in range(5):
                with disable_adapters(model):
                    disabled = model(ids).logits
        _assert_bit_identical(model, before)
        assert all(m.merged_adapters == ["b", "a"] for m in model.modules() if isinstance(m, LoraLayer))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, merged_out)
            expected = base(ids).logits
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(disabled, expected, atol=tol, rtol=0)


def test_bf16_disabled_merged_model_matches_the_base_model(ids):
    model, base, adapted = _merged_bf16_qwen(ids)
    with torch.no_grad():
        expected = base(ids).logits.float()
        with disable_adapters(model):
            got = model(ids).logits.float()
        merged = model(ids).logits.float()
    # The adapter moves the logits far more than bf16 rounding does, so "close to the base" is a
    # real check; and the disabled path is as close to the base as the merge is to the adapter.
    adapter_effect = (adapted.float() - expected).abs().max()
    merge_error = (merged - adapted.float()).abs().max()
    error = (got - expected).abs().max()
    assert adapter_effect > 20 * error
    assert error <= 2 * merge_error + 1e-2


def test_fp32_disabled_merged_model_matches_the_base_model_and_keeps_weights(ids):
    model = tiny_qwen3()
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model)
    merge_lora(model)
    before = _state(model)
    with torch.no_grad(), disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)
    _assert_bit_identical(model, before)


def test_gpt2_conv1d_and_embedding_merged_then_disabled(ids):
    model = tiny_gpt2(tie=False)
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc", "wte"]))
    randomize_lora(model)
    merge_lora(model)
    before = _state(model)
    with torch.no_grad(), disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)
    _assert_bit_identical(model, before)


def test_one_adapter_merged_another_live_then_disabled(ids):
    model = tiny_qwen3()
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj"]), adapter_name="b")
    randomize_lora(model)
    merge_lora(model, ["a"])
    set_active_adapters(model, ["a", "b"])
    with torch.no_grad():
        both = model(ids).logits
        with disable_adapters(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)
        assert torch.equal(model(ids).logits, both)


def test_disabled_merged_model_sends_no_gradient_to_the_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    merge_lora(model)
    x = torch.randn(3, 8, requires_grad=True)
    x_base = x.detach().clone().requires_grad_(True)
    with disable_adapters(model):
        model(x).square().sum().backward()
    base(x_base).square().sum().backward()
    torch.testing.assert_close(x.grad, x_base.grad, atol=1e-5, rtol=0)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" in n)

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, disable_adapters, inject_lora, merge_lora, unload_lora, unmerge_lora
from lorakit.lora import LoraLayer, ModulesToSave

from ..models import randomize_lora, tiny_gpt2, tiny_mlp, tiny_qwen3


def _adapted_qwen(rslora=False):
    model = tiny_qwen3()
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", use_rslora=rslora))
    randomize_lora(model)
    return model


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("build", [_adapted_qwen, lambda: _adapted_qwen(rslora=True)])
def test_merged_equals_unmerged_and_unmerge_restores(build, ids):
    model = build()
    base = _base_weights(model)
    with torch.no_grad():
        unmerged = model(ids).logits
        changed = merge_lora(model)
        assert len(changed) == 14
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert unmerge_lora(model) == changed
    for name, value in _base_weights(model).items():
        torch.testing.assert_close(value, base[name], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)


def test_merge_twice_is_idempotent(ids):
    model = _adapted_qwen()
    merge_lora(model)
    once = _base_weights(model)
    assert merge_lora(model) == []
    for name, value in _base_weights(model).items():
        assert torch.equal(value, once[name])


def test_merge_gpt2_conv1d_and_embedding(ids):
    gpt2 = tiny_gpt2(tie=False)
    inject_lora(gpt2, LoraConfig(r=4, target_modules=["c_attn", "c_fc", "wte"]))
    randomize_lora(gpt2)
    with torch.no_grad():
        before = gpt2(ids).logits
        merge_lora(gpt2)
        torch.testing.assert_close(gpt2(ids).logits, before, atol=1e-5, rtol=0)


def test_merge_into_tied_embedding_is_refused(ids):
    gpt2 = tiny_gpt2(tie=True)
    inject_lora(gpt2, LoraConfig(r=4, target_modules=["c_attn", "wte"]))
    randomize_lora(gpt2)
    weights = _base_weights(gpt2)
    with pytest.raises(ValueError, match=r"cannot merge into 'transformer.wte': its weight is shared"):
        merge_lora(gpt2)
    for name, value in _base_weights(gpt2).items():
        assert torch.equal(value, weights[name]), name


def test_merge_producing_nan_raises_and_changes_nothing():
    model = _adapted_qwen()
    weights = _base_weights(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj' would produce NaN/Inf"):
        merge_lora(model)
    for name, value in _base_weights(model).items():
        assert torch.equal(value, weights[name]), name
    assert not any(m.merged_adapters for _, m in model.named_modules() if isinstance(m, LoraLayer))


def test_half_precision_merge_overflow_is_caught():
    model = nn.Sequential(nn.Linear(4, 4)).half()
    inject_lora(model, LoraConfig(r=1, alpha=1, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_A["default"].weight.fill_(300.0)
        model[0].lora_B["default"].weight.fill_(300.0)  # 9e4 > fp16 max
    with pytest.raises(ValueError, match="NaN/Inf"):
        merge_lora(model)


def _within_half_ulp(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per element: is the bf16 ``got`` the nearest bf16 to the fp64 ``exact`` (up to fp32 rounding)?"""
    _, exponent = torch.frexp(got.double())
    half_ulp = torch.ldexp(torch.ones_like(exact), exponent - 9)  # bf16 keeps 8 significant bits
    return (got.double() - exact).abs() <= half_ulp + 1e-6 * exact.abs()


def test_bf16_merge_is_computed_in_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["0"]))
    # updates as large as the weights, so rounding twice (delta, then the sum) shows
    randomize_lora(model, scale=0.3)
    layer = model[0]
    w = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    exact = w.double() + (b.double() @ a.double()) * (8 / 4)  # by hand, fp64
    merge_lora(model)
    assert _within_half_ulp(layer.base_layer.weight, exact).all()
    # the check can tell: a merge done in bf16 misses the nearest value somewhere
    in_bf16 = w + ((b @ a) * 2).to(torch.bfloat16)
    assert not _within_half_ulp(in_bf16, exact).all()


def test_disable_adapters_on_a_merged_model_gives_base(ids):
    model = tiny_qwen3()
    with torch.no_grad():
        base = model(ids).logits
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model)
    merge_lora(model)
    with torch.no_grad(), disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base, atol=1e-5, rtol=0)
    assert all(m.merged_adapters == ["default"] for _, m in model.named_modules() if isinstance(m, LoraLayer))


def test_unload_with_merge_leaves_plain_model_with_same_outputs(ids):
    model = tiny_qwen3()
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    randomize_lora(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)
        adapted = model(ids).logits
    plain = unload_lora(model, merge=True)
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    assert type(plain.lm_head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted, atol=1e-5, rtol=0)


def test_unload_without_merge_restores_base(ids):
    model = tiny_mlp()
    with torch.no_grad():
        base = model(ids)
    inject_lora(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    merge_lora(model)
    plain = unload_lora(model, merge=False)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), base, atol=1e-6, rtol=0)


def test_merged_weights_are_the_plain_models_weights_and_leave_the_model_alone(ids):
    from lorakit.lora import merged_weights

    model = _adapted_qwen()
    base = _base_weights(model)
    with torch.no_grad():
        adapted = model(ids).logits
    weights = merged_weights(model)
    assert len(weights) == 14 and all(w.dtype == torch.float32 for w in weights.values())
    assert _base_weights(model).keys() == base.keys()
    for name, value in _base_weights(model).items():  # computed aside: nothing merged in place
        assert torch.equal(value, base[name])
    # Loaded into a copy of the base model by their state-dict names, they give the adapted outputs.
    plain = tiny_qwen3()
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert not unexpected and len(missing) == len(plain.state_dict()) - 14
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted, atol=1e-5, rtol=0)

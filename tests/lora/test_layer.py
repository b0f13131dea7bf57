import math

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, inject_lora, set_active_adapters
from lorakit.lora import LoraEmbedding, LoraLinear

from ..models import randomize_lora, tiny_gpt2, tiny_mlp, tiny_qwen3


def test_fresh_adapter_output_equals_base(ids):
    model = tiny_qwen3()
    with torch.no_grad():
        before = model(ids).logits
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_output_is_base_plus_scaled_BA(use_rslora):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    base_w, base_b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    inject_lora(model, LoraConfig(r=4, alpha=6, target_modules=["0"], use_rslora=use_rslora))
    randomize_lora(model)
    layer = model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = 6 / math.sqrt(4) if use_rslora else 6 / 4
    assert layer.scaling["default"] == pytest.approx(scale)
    x = torch.randn(5, 3, 12)
    expected = x @ base_w.T + base_b + (x @ a.T @ b.T) * scale
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def test_init_kaiming_A_zero_B_and_gaussian_option():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    inject_lora(model, LoraConfig(r=16, target_modules=["0"]))
    a = model[0].lora_A["default"].weight
    assert torch.count_nonzero(model[0].lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound

    inject_lora(model, LoraConfig(r=16, target_modules=["0"], init_lora_weights="gaussian"), adapter_name="g")
    g = model[0].lora_A["g"].weight
    assert g.std().item() == pytest.approx(1 / 16, rel=0.1)
    assert torch.count_nonzero(model[0].lora_B["g"].weight) == 0


def test_conv1d_gpt2_matches_transposed_formula(ids):
    model = tiny_gpt2()
    with torch.no_grad():
        base = model(ids).logits
    wrapped = inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["c_attn"]))
    assert wrapped == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    randomize_lora(model)
    x = torch.randn(2, 5, 32)
    w, bias = layer.base_layer.weight, layer.base_layer.bias  # Conv1D weight is (in, out)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), x @ w + bias + x @ a.T @ b.T * 2.0, atol=1e-6, rtol=1e-5)


def test_embedding_lora(ids):
    model = tiny_mlp()
    with torch.no_grad():
        base = model(ids)
    inject_lora(model, LoraConfig(r=4, alpha=4, target_modules=["embed"]))
    layer = model.embed
    assert isinstance(layer, LoraEmbedding)
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    randomize_lora(model)
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    expected = layer.base_layer.weight[ids] + a.T[ids] @ b.T
    torch.testing.assert_close(layer(ids), expected)
    # model code reading the wrapped layer's attributes still works
    assert layer.num_embeddings == 50 and layer.weight is layer.base_layer.weight


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    inject_lora(model, LoraConfig(r=2, dropout=0.5, target_modules=["0"]))
    randomize_lora(model)
    x = torch.randn(4, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_several_active_adapters_sum(ids):
    model = tiny_mlp()
    inject_lora(model, LoraConfig(r=2, target_modules=["up"], init_lora_weights=False), adapter_name="a")
    inject_lora(model, LoraConfig(r=3, target_modules=["up", "down"], init_lora_weights=False), adapter_name="b")
    x = torch.randn(2, 16)
    layer = model.layers[0]["up"]
    with torch.no_grad():
        base = layer.base_layer(x)
        set_active_adapters(model, ["a"])
        da = layer(x) - base
        set_active_adapters(model, ["b"])
        db = layer(x) - base
        set_active_adapters(model, ["a", "b"])
        torch.testing.assert_close(layer(x) - base, da + db, atol=1e-6, rtol=1e-5)
        set_active_adapters(model, [])
        assert torch.equal(layer(x), base)


def test_half_precision_base_gets_fp32_adapters():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    inject_lora(model, LoraConfig(r=2, target_modules=["0"]))
    assert model[0].lora_A["default"].weight.dtype == torch.float32
    out = model(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16

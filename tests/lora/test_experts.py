"""LoRA on fused MoE expert weights (target_parameters), checked against PEFT and the model's own routing."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lorakit import (
    LoraConfig,
    disable_adapters,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    set_active_adapters,
    trainable_report,
    unload_lora,
    unmerge_lora,
)
from lorakit.lora import LoraLayer, LoraParameter, route_adapters
from tests.models import MOE_FAMILIES, randomize_lora, tiny_moe

peft = pytest.importorskip("peft")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 61], [1, 2, 3, 4, 5, 6, 7]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def close(a, b, atol=1e-4):
    return torch.allclose(a, b, atol=atol, rtol=0)


# --- interop with the real peft, both ways ------------------------------------------------------
VARIANTS = {
    "experts": dict(target_modules=[]),
    "experts+attention": dict(target_modules=["q_proj", "o_proj"]),
    "rslora": dict(target_modules=["q_proj", "o_proj"], use_rslora=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lorakit_expert_adapter_loads_in_peft(tmp_path, family, variant):
    model = tiny_moe(family)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_parameters=EXPERTS, **VARIANTS[variant]))
    randomize_lora(model)
    want = logits(model)
    assert not close(want, logits(tiny_moe(family)))
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_parameters"] == EXPERTS

    theirs = peft.PeftModel.from_pretrained(tiny_moe(family), str(tmp_path)).eval()
    assert close(logits(theirs), want)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_peft_expert_adapter_loads_in_lorakit(tmp_path, family, variant):
    spec = dict(VARIANTS[variant])
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=spec.pop("target_modules"), target_parameters=EXPERTS,
                             init_lora_weights=False, **spec)
    theirs = peft.get_peft_model(tiny_moe(family), config).eval()
    want = logits(theirs)
    theirs.save_pretrained(str(tmp_path))

    model = tiny_moe(family)
    load_adapter(model, tmp_path)
    assert close(logits(model), want)


def test_rank_and_alpha_patterns_apply_to_expert_weights(tmp_path):
    model = tiny_moe("qwen3_moe")
    config = LoraConfig(r=4, alpha=8, target_modules=[], target_parameters=EXPERTS,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 3})
    inject_lora(model, config)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LoraParameter) and experts.param_name == "down_proj"
    assert experts.r["default"] == 2 and experts.base_layer.r["default"] == 4
    assert experts.base_layer.scaling["default"] == 3 / 4 and experts.scaling["default"] == 8 / 2
    assert tuple(experts.lora_A["default"].weight.shape) == (4 * 2, 16)  # (experts * r, intermediate)
    randomize_lora(model)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_moe("qwen3_moe"), str(tmp_path)).eval()
    assert close(logits(theirs), logits(model))


def test_router_named_explicitly_matches_peft(tmp_path):
    model = tiny_moe("qwen3_moe")
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=[], target_parameters=EXPERTS + ["mlp.gate.weight"]))
    randomize_lora(model)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_moe("qwen3_moe"), str(tmp_path)).eval()
    assert close(logits(theirs), logits(model))


# --- choosing targets ----------------------------------------------------------------------------
def test_all_linear_covers_experts_and_leaves_routers_out():
    model = tiny_moe("qwen2_moe")
    paths = inject_lora(model, LoraConfig(r=4, alpha=8))
    assert "model.layers.0.mlp.experts" in paths and "model.layers.0.mlp.experts.base_layer" in paths
    assert "model.layers.0.mlp.shared_expert.gate_proj" in paths
    assert not any(p.endswith(("shared_expert_gate", "mlp.gate")) for p in paths)
    stored = model._lorakit_configs["default"]
    assert stored.target_parameters == sorted(EXPERTS)
    assert "shared_expert_gate" not in stored.target_modules
    assert "mlp.experts.gate_up_proj" in str(trainable_report(model))

    explicit = tiny_moe("qwen2_moe")
    paths = inject_lora(explicit, LoraConfig(r=4, alpha=8, target_modules=["shared_expert_gate"], target_parameters=[]))
    assert paths == ["model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_all_linear_reaches_the_experts_of_every_family(family):
    model = tiny_moe(family)
    paths = inject_lora(model, LoraConfig(r=2))
    assert {"model.layers.1.mlp.experts", "model.layers.1.mlp.experts.base_layer"} <= set(paths)
    assert model._lorakit_configs["default"].target_parameters == sorted(EXPERTS)
    assert not any(p.endswith((".gate", ".router")) for p in paths)


def test_naming_the_experts_module_in_target_modules_points_to_target_parameters():
    with pytest.raises(ValueError, match=r"target_parameters=\['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'\]"):
        inject_lora(tiny_moe("qwen3_moe"), LoraConfig(target_modules=["experts"]))


def test_unmatched_target_parameters_list_candidates():
    with pytest.raises(ValueError, match="matched no parameter.*experts.gate_up_proj"):
        inject_lora(tiny_moe("qwen3_moe"), LoraConfig(target_modules=[], target_parameters=["mlp.experts.w1"]))


def test_config_round_trip_and_dropout_saved_as_zero():
    config = LoraConfig(r=4, dropout=0.05, target_parameters=EXPERTS)
    data = config.to_peft_dict()
    assert data["target_parameters"] == EXPERTS and data["lora_dropout"] == 0.0
    assert LoraConfig.from_dict(data).target_parameters == EXPERTS
    assert LoraConfig(target_parameters="mlp.experts.gate_up_proj, mlp.experts.down_proj").target_parameters == EXPERTS
    with pytest.raises(ValueError, match="target_parameters"):
        LoraConfig(target_parameters=[3])


# --- merge, adapters, routing ---------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_merge_unmerge_unload_and_disable(family):
    model = tiny_moe(family)
    base = logits(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_lora(model, LoraConfig(r=4, alpha=8, init_lora_weights=False))
    out = logits(model)
    assert not close(out, base)
    with disable_adapters(model):
        assert close(logits(model), base, 1e-6)

    merge_lora(model)
    assert close(logits(model), out)
    with disable_adapters(model):
        assert close(logits(model), base)
    unmerge_lora(model)
    restored = dict(unload_lora(copy.deepcopy(model), merge=False).named_parameters())
    assert set(restored) == set(before)
    assert all(torch.allclose(restored[n], before[n], atol=1e-6) for n in before)

    plain = unload_lora(model, merge=True)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert close(logits(plain), out)
    assert set(dict(plain.named_parameters())) == set(before)


def test_two_active_adapters_sum_like_their_merge():
    model = tiny_moe("qwen3_moe")
    inject_lora(model, LoraConfig(r=4, alpha=8, init_lora_weights=False), adapter_name="a")
    inject_lora(model, LoraConfig(r=2, alpha=4, init_lora_weights=False), adapter_name="b")
    set_active_adapters(model, ["a", "b"])
    both = logits(model)
    set_active_adapters(model, ["a"])
    assert not close(logits(model), both)
    merge_lora(model, ["a", "b"])
    set_active_adapters(model, [])
    assert close(logits(model), both)


def test_different_parameter_sets_per_adapter_are_refused():
    model = tiny_moe("qwen3_moe")
    inject_lora(model, LoraConfig(target_modules=[], target_parameters=EXPERTS), adapter_name="a")
    with pytest.raises(ValueError, match="same parameters"):
        inject_lora(model, LoraConfig(target_modules=[], target_parameters=["mlp.experts.down_proj"]), adapter_name="b")


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("grad", [False, True])
def test_mixed_batch_rows_equal_solo_rows(family, grad):
    model = tiny_moe(family)
    inject_lora(model, LoraConfig(r=4, alpha=8, init_lora_weights=False), adapter_name="a")
    inject_lora(model, LoraConfig(r=2, alpha=8, init_lora_weights=False), adapter_name="b")
    ids = torch.tensor([[5, 17, 99, 3], [1, 2, 3, 4], [9, 9, 40, 2]])
    rows = ["a", None, "b"]
    with torch.set_grad_enabled(grad), route_adapters(model, rows):
        mixed = model(ids).logits.detach()
    for i, name in enumerate(rows):
        if name is None:
            with disable_adapters(model):
                solo = logits(model, ids[i : i + 1])
        else:
            set_active_adapters(model, [name])
            solo = logits(model, ids[i : i + 1])
        assert close(mixed[i : i + 1], solo, 1e-5), (i, name)


# --- training -------------------------------------------------------------------------------------
def test_training_step_changes_only_lora_parameters():
    model = tiny_moe("qwen3_moe").train()
    inject_lora(model, LoraConfig(r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):  # B starts at zero: A moves from the second step on
        loss = torch.nn.functional.cross_entropy(model(IDS).logits[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    assert any("experts.base_layer.lora_A" in n for n in changed) and any("experts.lora_B" in n for n in changed)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_only_routed_tokens_reach_an_experts_adapter(family):
    model = tiny_moe(family, experts=8, top_k=1)
    inject_lora(model, LoraConfig(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS))
    randomize_lora(model)  # B != 0, so A gets gradients wherever tokens pass
    chosen: dict[int, torch.Tensor] = {}

    def record(layer):
        def hook(module, args, output):
            chosen[layer] = output[2] if len(output) == 3 else output[1]  # the router's own top-k expert ids
        return hook

    for i, layer in enumerate(model.model.layers):
        router = getattr(layer.mlp, "gate", None) or layer.mlp.router
        router.register_forward_hook(record(i))
    ids = torch.tensor([[7, 100, 33]])
    model(ids).logits.square().sum().backward()

    for i, layer in enumerate(model.model.layers):
        hit = set(chosen[i].flatten().tolist())
        assert 0 < len(hit) < 8  # some experts got no token
        for wrapper in layer.mlp.experts._chain():
            a, b = wrapper.factors("default")
            grad_a = wrapper.lora_A["default"].weight.grad.view_as(a)
            grad_b = wrapper.lora_B["default"].weight.grad.view(b.shape[1], b.shape[2], 8).permute(2, 0, 1)
            for e in range(8):
                touched = bool(grad_a[e].abs().sum() > 0 and grad_b[e].abs().sum() > 0)
                assert touched == (e in hit), (i, wrapper.param_name, e, hit)


def test_bf16_base_trains_fp32_expert_adapters_and_merges():
    model = tiny_moe("qwen3_moe").to(torch.bfloat16).train()
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    experts = model.model.layers[0].mlp.experts
    assert experts.lora_A["default"].weight.dtype == torch.float32  # small updates survive in fp32
    model(IDS).logits.float().square().mean().backward()
    assert experts.base_layer.lora_B["default"].weight.grad.abs().sum() > 0
    model.eval()
    randomize_lora(model)
    out = logits(model).float()
    merge_lora(model)
    assert torch.allclose(logits(model).float(), out, atol=0.1)


def test_disable_on_merged_bf16_experts_never_rewrites_weights():
    # Issue 12 item 3 for expert weights: disable_adapters on a merged half-precision MoE model
    # must leave every weight bit-identical, and give the base model's output up to merge rounding.
    model = tiny_moe("qwen3_moe").to(torch.bfloat16)
    base_model = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, alpha=8, init_lora_weights=False, target_modules=[],
                                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    merge_lora(model)
    merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        adapted = model(IDS).logits.float()
        for _ in range(3):
            with disable_adapters(model):
                disabled = model(IDS).logits.float()
    assert all(torch.equal(p, merged[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        expected = base_model(IDS).logits.float()
    err = (disabled - expected).abs().max().item()
    effect = (adapted - expected).abs().max().item()
    assert err < effect / 5, (err, effect)


def test_dora_on_expert_weights_is_refused_naming_the_key():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match="use_dora: .*experts.*target_parameters: \\[\\] or use_dora: false"):
        inject_lora(model, LoraConfig(r=4, use_dora=True))  # all-linear reaches the experts
    inject_lora(model, LoraConfig(r=4, use_dora=True, target_parameters=[]))  # attention only: fine

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lorakit import (
    LoraConfig,
    delete_adapter,
    disable_adapters,
    inject_lora,
    route_adapters,
    set_active_adapters,
    trainable_report,
)
from lorakit.lora import ModulesToSave, active_adapters

from ..models import randomize_lora, tiny_gpt2, tiny_mlp, tiny_qwen3

ATTN = "model.layers.{}.self_attn.{}"


def test_list_targets_match_exact_names_and_dotted_suffixes():
    model = tiny_qwen3()
    wrapped = inject_lora(model, LoraConfig(target_modules=["q_proj", "layers.1.mlp.down_proj"]))
    assert wrapped == [ATTN.format(0, "q_proj"), ATTN.format(1, "q_proj"), "model.layers.1.mlp.down_proj"]


def test_comma_string_from_seed_yaml():
    model = tiny_qwen3()
    wrapped = inject_lora(model, LoraConfig(target_modules="o_proj,q_proj,k_proj,v_proj"))
    assert len(wrapped) == 8 and all(".self_attn." in w for w in wrapped)


def test_regex_is_a_full_match():
    model = tiny_qwen3()
    wrapped = inject_lora(model, LoraConfig(target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj"))
    assert wrapped == [ATTN.format(0, "q_proj"), ATTN.format(0, "v_proj")]
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(tiny_qwen3(), LoraConfig(target_modules=r"q_proj"[:-1] + "(x)"))


def test_all_linear_skips_output_head_and_embeddings():
    model = tiny_qwen3()
    wrapped = inject_lora(model, LoraConfig(target_modules="all-linear"))
    assert len(wrapped) == 2 * 7 and "lm_head" not in wrapped
    assert not any("embed" in w for w in wrapped)
    gpt2 = tiny_gpt2()
    wrapped = inject_lora(gpt2, LoraConfig(target_modules="all-linear"))
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == {"c_attn", "c_proj", "c_fc"}
    plain = tiny_mlp()
    assert "lm_head" not in inject_lora(plain, LoraConfig(target_modules="all-linear"))


def test_exclude_layers_to_transform_and_patterns():
    model = tiny_qwen3()
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=["o_proj"],
                     layers_to_transform=[1], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 1})
    wrapped = inject_lora(model, cfg)
    assert wrapped == [ATTN.format(1, "q_proj"), ATTN.format(1, "v_proj")]
    q, v = model.model.layers[1].self_attn.q_proj, model.model.layers[1].self_attn.v_proj
    assert q.r["default"] == 4 and q.scaling["default"] == 1 / 4
    assert v.r["default"] == 2 and v.scaling["default"] == 8 / 2


def test_nothing_matched_lists_candidates():
    with pytest.raises(ValueError) as err:
        inject_lora(tiny_qwen3(), LoraConfig(target_modules=["qproj"]))
    message = str(err.value)
    assert "matched no module of Qwen3ForCausalLM" in message
    for name in ("q_proj", "k_proj", "gate_proj", "lm_head", "embed_tokens"):
        assert name in message


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match=r"'model.layers.0.input_layernorm' .* Qwen3RMSNorm"):
        inject_lora(tiny_qwen3(), LoraConfig(target_modules=["input_layernorm"]))


def test_only_lora_params_train_and_a_step_leaves_base_bit_exact(ids):
    model = tiny_qwen3()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for key, value in base.items():
        wrapped_key = key.replace(".weight", ".base_layer.weight") if key not in after else key
        assert torch.equal(after[wrapped_key], value), key
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if ".lora_B." in n)


def test_modules_to_save_trains_a_copy(ids):
    model = tiny_qwen3()
    original = model.lm_head.weight.clone()
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, ModulesToSave)
    copy = model.lm_head.modules_to_save["default"]
    assert copy.weight.requires_grad and not model.lm_head.original_module.weight.requires_grad
    with torch.no_grad():
        copy.weight.add_(1.0)
        adapted = model(ids).logits
        with disable_adapters(model):
            base = model(ids).logits
    assert not torch.allclose(adapted, base)
    assert torch.equal(model.lm_head.original_module.weight, original)


def test_trainable_report_counts(ids):
    model = tiny_qwen3()
    total = sum(p.numel() for p in model.parameters())
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    report = trainable_report(model)
    lora = 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    assert (report.total, report.trainable, report.wrapped_modules) == (total + lora, lora, 4)
    text = str(report)
    assert "Trainable parameters: " + f"{lora:,}" in text and "Wrapped modules: 4" in text
    assert f"Trainable %: {100 * lora / (total + lora):.4f}%" in text


def test_disable_adapters_gives_base_and_restores(ids):
    model = tiny_qwen3()
    with torch.no_grad():
        base = model(ids).logits
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model)
    with torch.no_grad():
        adapted = model(ids).logits
        with disable_adapters(model):
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, adapted)
    assert not torch.allclose(adapted, base)


def test_set_active_adapters_validates_and_switches(ids):
    model = tiny_mlp()
    inject_lora(model, LoraConfig(r=2, target_modules=["up"], init_lora_weights=False), adapter_name="a")
    inject_lora(model, LoraConfig(r=2, target_modules=["up"], init_lora_weights=False), adapter_name="b")
    assert active_adapters(model) == ["b"]
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]"):
        set_active_adapters(model, ["a", "c"])
    with torch.no_grad():
        set_active_adapters(model, "a")
        out_a = model(ids)
        set_active_adapters(model, "b")
        assert not torch.allclose(out_a, model(ids))


class _CountLinear(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_mixed_batch_rows_equal_single_adapter_runs_grouped_per_adapter():
    model = tiny_qwen3()
    for name, seed in (("math", 1), ("code", 2)):
        inject_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), adapter_name=name)
        randomize_lora(model, seed=seed)
    ids = torch.randint(0, 128, (6, 9), generator=torch.Generator().manual_seed(3))
    rows = ["math", None, "code", "math", "code", None]
    with torch.no_grad():
        singles = {}
        for name in ("math", "code"):
            set_active_adapters(model, [name])
            singles[name] = model(ids).logits
        with disable_adapters(model):
            singles[None] = model(ids).logits
        with route_adapters(model, rows):
            gathered = model(ids).logits  # inference: each row's A/B gathered, two batched matmuls per layer
    counter = _CountLinear()
    with route_adapters(model, rows), counter:
        grouped = model(ids).logits  # with autograd: one pass per adapter group
    for i, name in enumerate(rows):
        torch.testing.assert_close(gathered[i], singles[name][i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grouped[i].detach(), singles[name][i], atol=1e-5, rtol=1e-5)
    # 14 base linears + lm_head, then A and B once per adapter (2 groups) on the 6 wrapped layers
    assert counter.calls == 15 + 6 * 2 * 2


def test_gathered_routing_sees_in_place_weight_updates():
    model = tiny_qwen3()
    for name in ("a", "b"):
        inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name=name)
    randomize_lora(model)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), route_adapters(model, ["a", "b"]):
        before = model(ids).logits
        model.model.layers[0].self_attn.q_proj.lora_B["b"].weight.mul_(3.0)
        after = model(ids).logits
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_route_adapters_rejects_unknown_names():
    model = tiny_mlp()
    inject_lora(model, LoraConfig(r=2, target_modules=["up"]))
    with pytest.raises(ValueError, match="unknown adapter"):
        with route_adapters(model, ["default", "nope"]):
            pass


def test_delete_adapter(ids):
    model = tiny_mlp()
    with torch.no_grad():
        base = model(ids)
    inject_lora(model, LoraConfig(r=2, target_modules=["up"], init_lora_weights=False), adapter_name="a")
    delete_adapter(model, "a")
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    with pytest.raises(ValueError, match="unknown adapter 'a'"):
        delete_adapter(model, "a")


def test_same_adapter_name_twice_is_refused():
    model = tiny_mlp()
    inject_lora(model, LoraConfig(r=2, target_modules=["up"]))
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        inject_lora(model, LoraConfig(r=2, target_modules=["up"]))

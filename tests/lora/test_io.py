import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, inject_lora, load_adapter, save_adapter, set_active_adapters
from lorakit.lora import LoraLayer, active_adapters, adapter_names

from ..models import randomize_lora, tiny_qwen3

CFG = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _trained(seed=0):
    model = tiny_qwen3(seed=seed)
    inject_lora(model, CFG)
    randomize_lora(model, seed=seed + 100)
    return model


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [type(m).__name__ for m in model.modules()],
        {n: p.requires_grad for n, p in model.named_parameters()},
        active_adapters(model),
    )


def test_round_trip_under_a_different_seed(tmp_path, ids):
    model = _trained()
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "ad")
    torch.manual_seed(999)  # the fresh adapter's random init must not leak into the result
    fresh = tiny_qwen3(seed=0)
    config = load_adapter(fresh, tmp_path / "ad")
    assert config.r == 4 and config.target_modules == ["q_proj", "v_proj", "down_proj"]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_peft_layout_and_key_names(tmp_path):
    model = _trained()
    save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 12 and not any("default" in k for k in keys)
    data = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["lora_alpha"] == 8 and data["r"] == 4
    assert not list(tmp_path.glob("**/*.tmp-*")) and not list(tmp_path.glob("**/*.bin"))


def test_non_default_adapters_go_to_subfolders(tmp_path, ids):
    model = _trained()
    inject_lora(model, LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), adapter_name="extra")
    written = save_adapter(model, tmp_path / "all")
    assert written == [tmp_path / "all", tmp_path / "all" / "extra"]
    assert (tmp_path / "all" / "extra" / "adapter_config.json").is_file()
    fresh = tiny_qwen3()
    load_adapter(fresh, tmp_path / "all" / "extra", adapter_name="extra")
    set_active_adapters(model, ["extra"])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_save_overwrites_existing_dir_atomically_keeping_other_files(tmp_path, ids):
    model = _trained()
    target = tmp_path / "ad"
    save_adapter(model, target)
    (target / "README.md").write_text("notes")
    randomize_lora(model, seed=7)
    save_adapter(model, target)
    assert (target / "README.md").read_text() == "notes"
    fresh = tiny_qwen3()
    load_adapter(fresh, target)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_load_into_existing_adapter_updates_weights_and_scale(tmp_path, ids):
    model = _trained(seed=0)
    other = _trained(seed=1)
    save_adapter(other, tmp_path / "ad")
    load_adapter(model, tmp_path / "ad")
    a = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(a, other.model.layers[0].self_attn.q_proj.lora_A["default"].weight)


def _write(tmp_path, tensors, config=CFG):
    target = tmp_path / "bad"
    target.mkdir(exist_ok=True)
    (target / "adapter_config.json").write_text(config.to_json_string())
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target


@pytest.mark.parametrize("existing", [False, True])
def test_bad_files_raise_and_leave_model_exactly_as_before(tmp_path, existing):
    good = _trained(seed=3)
    save_adapter(good, tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    model = tiny_qwen3()
    if existing:
        inject_lora(model, CFG)
    before = _snapshot(model)

    missing = dict(tensors)
    del missing[key]
    with pytest.raises(ValueError, match=r"missing key 'model.layers.0.self_attn.q_proj.lora_A.weight'"):
        load_adapter(model, _write(tmp_path, missing))

    wrong = dict(tensors)
    wrong[key] = torch.zeros(3, 32)
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.q_proj'\): file has \(3, 32\), model expects \(4, 32\)"):
        load_adapter(model, _write(tmp_path, wrong))

    extra = dict(tensors)
    extra["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    with pytest.raises(ValueError, match=r"unexpected key .*k_proj"):
        load_adapter(model, _write(tmp_path, extra))

    after = _snapshot(model)
    assert after[1:] == before[1:]
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_seed_minimal_pth_format_loads_with_alpha_equal_r(tmp_path, ids):
    model = tiny_qwen3()
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(2):
        for proj in ("q_proj", "o_proj"):
            name = f"model.layers.{i}.self_attn.{proj}"
            state[f"module.{name}.lora.A.weight"] = torch.randn(8, 32, generator=g) * 0.02
            state[f"module.{name}.lora.B.weight"] = torch.randn(32, 8, generator=g) * 0.02
    torch.save(state, tmp_path / "lora_identity_32.pth")
    config = load_adapter(model, tmp_path / "lora_identity_32.pth")
    assert config.r == 8 and config.alpha == 8
    layer = model.model.layers[1].self_attn.o_proj
    assert isinstance(layer, LoraLayer) and layer.scaling["default"] == 1.0
    x = torch.randn(2, 32)
    a = state["module.model.layers.1.self_attn.o_proj.lora.A.weight"]
    b = state["module.model.layers.1.self_attn.o_proj.lora.B.weight"]
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ a.T @ b.T)  # seed: base(x) + B(A(x))
    # and it saves on as a PEFT adapter
    save_adapter(model, tmp_path / "converted")
    again = tiny_qwen3()
    load_adapter(again, tmp_path / "converted")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_seed_format_unknown_module_is_named(tmp_path):
    state = {"model.layers.0.self_attn.qq.lora.A.weight": torch.zeros(2, 32),
             "model.layers.0.self_attn.qq.lora.B.weight": torch.zeros(32, 2)}
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="matched no module"):
        load_adapter(tiny_qwen3(), tmp_path / "bad.pth")


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x.lora.A.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        load_adapter(tiny_qwen3(), tmp_path / "evil.pth")


def test_load_activate_false_keeps_current_adapter(tmp_path):
    model = _trained()
    save_adapter(model, tmp_path / "ad")
    load_adapter(model, tmp_path / "ad", adapter_name="second", activate=False)
    assert adapter_names(model) == ["default", "second"] and active_adapters(model) == ["default"]


def test_missing_directory_error():
    with pytest.raises(FileNotFoundError, match="no such adapter"):
        load_adapter(tiny_qwen3(), "/nonexistent/adapter")

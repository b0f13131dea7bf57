"""Edge cases found in review: each failed before its fix."""

import json

import pytest
import torch

from lorakit import (
    LoraConfig,
    disable_adapters,
    inject_lora,
    load_adapter,
    merge_lora,
    route_adapters,
    save_adapter,
    set_active_adapters,
)
from lorakit.lora import active_adapters, delete_adapter

from ..models import randomize_lora, tiny_qwen3

peft = pytest.importorskip("peft")


def test_dropout_follows_eval_mode_on_inject_and_load(tmp_path, ids):
    model = tiny_qwen3()  # built in eval mode
    inject_lora(model, LoraConfig(r=4, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    with torch.no_grad():
        first = model(ids).logits
        assert torch.equal(first, model(ids).logits)
    save_adapter(model, tmp_path / "ad")
    fresh = tiny_qwen3()
    load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, first)


def test_modules_to_save_attributes_come_from_the_active_copy():
    model = tiny_qwen3()
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert model.lm_head.weight is model.lm_head.modules_to_save["default"].weight
    with disable_adapters(model):
        assert model.lm_head.weight is model.lm_head.original_module.weight


def test_modules_inside_modules_to_save_take_no_lora(tmp_path, ids):
    cfg = dict(r=4, target_modules="all-linear", modules_to_save=["model.layers.1.mlp"])
    wrapped = inject_lora(tiny_qwen3(), LoraConfig(alpha=8, **cfg))
    assert not any(w.startswith("model.layers.1.mlp") for w in wrapped)
    theirs = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(lora_alpha=8, **cfg))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
        expected = theirs(input_ids=ids).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_qwen3()
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)


def test_refused_switch_leaves_active_adapters_unchanged():
    model = tiny_qwen3()
    for name in ("a", "b"):
        inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter_name=name)
    with pytest.raises(ValueError, match="only one of them can be active"):
        set_active_adapters(model, ["a", "b"])
    assert active_adapters(model) == ["b"]
    assert model.model.layers[0].self_attn.q_proj.active_adapters == ["b"]


def test_deleting_a_merged_adapter_is_refused_before_anything_changes():
    model = tiny_qwen3()
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    merge_lora(model)
    with pytest.raises(RuntimeError, match="is merged"):
        delete_adapter(model, "default")
    assert "default" in model.model.embed_tokens.modules_to_save


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_modules=r".*q_proj", layers_to_transform=[0]), "cannot be combined with a regex"),
        (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
        (dict(layers_to_transform="1"), "layers_to_transform must be a list"),
        (dict(modules_to_save=[1]), "modules_to_save must be a list"),
        (dict(rank_pattern={"(q": 2}), "not a valid regex"),
        (dict(use_rslora="no"), "use_rslora must be true or false"),
    ],
)
def test_configs_peft_would_refuse_or_mistyped_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_json_with_wrong_types_is_a_named_error(tmp_path):
    data = LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    data["alpha_pattern"] = ["q_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"adapter_config.json: LoraConfig.alpha_pattern must be a mapping"):
        LoraConfig.from_json(tmp_path)


def test_init_methods_that_only_shape_the_start_load_and_base_rewriting_ones_are_refused():
    data = LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    assert LoraConfig.from_dict({**data, "init_lora_weights": "orthogonal"}).init_lora_weights is True
    with pytest.raises(ValueError, match="rewrites the base model's weights"):
        LoraConfig.from_dict({**data, "init_lora_weights": "pissa_niter_4"}, source="x.json")


def test_full_path_target_bypasses_layers_to_transform_like_peft(tmp_path, ids):
    cfg = dict(r=4, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    wrapped = inject_lora(tiny_qwen3(), LoraConfig(**cfg))
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    theirs = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(**cfg))
    theirs.save_pretrained(tmp_path / "peft")
    load_adapter(tiny_qwen3(), tmp_path / "peft")  # same modules on both sides: no missing/unexpected key


def test_route_adapters_rejects_a_batch_of_another_size(ids):
    model = tiny_qwen3()
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with route_adapters(model, ["default", None]), pytest.raises(RuntimeError, match="2 row adapters but the batch has 3"):
        model(ids)


def test_reloading_into_an_existing_adapter_takes_the_files_dropout(tmp_path):
    model = tiny_qwen3()
    inject_lora(model, LoraConfig(r=2, dropout=0.3, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "ad")
    other = tiny_qwen3()
    inject_lora(other, LoraConfig(r=2, dropout=0.0, target_modules=["q_proj"]))
    load_adapter(other, tmp_path / "ad")
    assert other.model.layers[0].self_attn.q_proj.lora_dropout["default"].p == 0.3

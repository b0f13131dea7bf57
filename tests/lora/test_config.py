import json

import pytest

from lorakit import LoraConfig


def test_comma_string_is_a_list_of_names():
    cfg = LoraConfig(target_modules="o_proj,q_proj, k_proj,v_proj")
    assert cfg.target_modules == ["o_proj", "q_proj", "k_proj", "v_proj"]


def test_single_name_string_is_a_list_and_regex_stays_a_string():
    assert LoraConfig(target_modules="q_proj").target_modules == ["q_proj"]
    assert LoraConfig(target_modules=r".*\.(q|v)_proj").target_modules == r".*\.(q|v)_proj"
    assert LoraConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"), ({"r": -2}, "r"), ({"r": 2.5}, "r"), ({"r": True}, "r"),
        ({"alpha": 0}, "alpha"), ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": -3}}, "alpha_pattern"),
        ({"init_lora_weights": "pissa_niter_x"}, "init_lora_weights"),
        ({"bias": "all"}, "bias"),
        ({"target_modules": "(unclosed"}, "target_modules"),
        ({"target_modules": ["q_proj", 3]}, "target_modules"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        LoraConfig(**kwargs)


def test_peft_dict_round_trip_and_key_names():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True,
                     rank_pattern={"layers.1.q_proj": 2}, modules_to_save=["lm_head"])
    data = cfg.to_peft_dict()
    assert data["lora_alpha"] == 8 and isinstance(data["lora_alpha"], int)
    assert data["lora_dropout"] == 0.1 and data["peft_type"] == "LORA"
    assert "alpha" not in data and data["use_dora"] is False
    assert LoraConfig.from_dict(data) == cfg


def test_unknown_json_key_is_named_with_a_suggestion(tmp_path):
    data = LoraConfig().to_peft_dict()
    data["lora_alhpa"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"adapter_config.json: unknown key 'lora_alhpa' \(did you mean 'lora_alpha'\?\)"):
        LoraConfig.from_json(tmp_path)


def test_invalid_value_in_json_names_file_and_field(tmp_path):
    data = LoraConfig().to_peft_dict()
    data["r"] = 0
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"adapter_config.json: LoraConfig\.r must be a positive integer"):
        LoraConfig.from_json(tmp_path)


def test_unsupported_peft_variant_is_refused_not_ignored():
    data = LoraConfig().to_peft_dict()
    data["lora_bias"] = True
    with pytest.raises(ValueError, match="'lora_bias' = True is a LoRA variant lorakit does not support"):
        LoraConfig.from_dict(data, source="x.json")


def test_bad_json_names_file_and_line(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{\n  "r": 8,\n  oops\n}')
    with pytest.raises(ValueError, match=r"adapter_config.json:3: invalid JSON"):
        LoraConfig.from_json(tmp_path)


def test_pattern_lookup_follows_peft_suffix_rule():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 4})
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert cfg.rank_for("model.layers.11.self_attn.q_proj") == 8  # dotted tail only, not a substring
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.alpha_for("model.layers.0.self_attn.q_proj") == 16

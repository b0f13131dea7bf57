"""LoRA variants in the recipes: SFT and GRPO run end to end with QLoRA (nf4), DoRA, LoRA+ and PiSSA,
and a run stopped at a checkpoint and resumed equals the uninterrupted run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit.recipes.grpo as grpo
import lorakit.recipes.sft as sft
from lorakit.config import ConfigError, load_config
from lorakit.lora import LoraConfig, load_adapter
from lorakit.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SFT_DATA = ROOT / "examples" / "data" / "identity.jsonl"
PROMPTS = ROOT / "examples" / "data" / "arith_rl.jsonl"

VARIANTS = {
    "nf4": {"quantization": "nf4"},
    "dora": {"lora": {"use_dora": True}},
    "loraplus": {"train": {"loraplus_lr_ratio": 8.0}},
    "pissa": {"lora": {"init_lora_weights": "pissa_niter_2"}},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from lorakit.models import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


def _write(tmp_path, body, variant, name):
    for section, values in VARIANTS[variant].items():
        if isinstance(values, dict):
            body.setdefault(section, {}).update(values)
        else:
            body[section] = values
    path = tmp_path / name
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def _sft_config(tmp_path, demo, variant, out, **train):
    body = {"model": str(demo), "output_dir": str(tmp_path / out), "data": {"train": str(SFT_DATA)},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
            "train": {"batch_size": 4, "lr": 2e-3, "max_seq_len": 64, "seed": 7, "lr_scheduler": "constant",
                      "warmup_ratio": 0.0, "gradient_checkpointing": True, **train}}
    return _write(tmp_path, body, variant, f"{out}.yaml")


def _grpo_config(tmp_path, demo, variant, out, **train):
    body = {"recipe": "grpo", "model": str(demo), "output_dir": str(tmp_path / out), "data": {"train": str(PROMPTS)},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "grpo": {"prompts_per_step": 2, "rewards": {"numeric_match": 1.0, "tests.rl.rewards_for_tests:odd_chars": 0.1}},
            "rollout": {"num_generations": 4, "max_new_tokens": 4},
            "train": {"batch_size": 4, "lr": 5e-3, "seed": 3, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                      "gradient_checkpointing": True, **train}}
    return _write(tmp_path, body, variant, f"{out}.yaml")


def _same_adapters(a_dir, b_dir):
    a = load_file(Path(a_dir) / "adapter_model.safetensors")
    b = load_file(Path(b_dir) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sft_runs_and_resumes_exactly(tmp_path, demo, variant):
    lines = []
    straight = sft.run(load_config(_sft_config(tmp_path, demo, variant, "straight", max_steps=4)), log=lines.append)
    sft.run(load_config(_sft_config(tmp_path, demo, variant, "resumed", max_steps=2, save_steps=2)), log=lambda _: None)
    resumed = sft.run(load_config(_sft_config(tmp_path, demo, variant, "resumed", max_steps=4, save_steps=2)),
                      resume=True, log=lambda _: None)
    assert _same_adapters(straight, resumed) <= 1e-6
    saved = load_file(straight / "adapter_model.safetensors")
    config = json.loads((straight / "adapter_config.json").read_text())
    if variant == "nf4":
        assert any("Quantized" in line and "nf4" in line for line in lines)
    if variant == "dora":
        assert config["use_dora"] is True
        assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == 3 * 4  # 3 targets x 4 layers
    if variant == "pissa":  # the final adapter is plain LoRA of rank 2r for the original base
        assert config["init_lora_weights"] is True and config["r"] == 8 and config["lora_alpha"] == 16
        checkpoint = json.loads((tmp_path / "resumed" / "checkpoint-4" / "adapter_config.json").read_text())
        assert checkpoint["init_lora_weights"] == "pissa_niter_2" and checkpoint["r"] == 4
    if variant == "loraplus":
        meta = json.loads((tmp_path / "resumed" / "checkpoint-4" / "optimizer.json").read_text())
        scales = {g["name"]: g["lr_scale"] for g in meta["param_groups"]}
        assert scales == {"A": 1.0, "B": 8.0}
        assert all(".lora_B." in n for g in meta["param_groups"] if g["name"] == "B" for n in g["params"])


def test_pissa_final_adapter_on_the_original_base_is_the_trained_model(tmp_path, demo):
    """The converted adapter, loaded on the untouched base, reproduces the trained (residual) model."""
    cfg = load_config(_sft_config(tmp_path, demo, "pissa", "run", max_steps=3))
    captured = {}
    original_final = sft.final_adapter

    def spy(model, name):
        ids = torch.arange(2, 30).reshape(2, 14)
        with torch.no_grad():
            captured["logits"] = model(input_ids=ids).logits
        captured["ids"] = ids
        return original_final(model, name)

    sft.final_adapter = spy
    try:
        adapter = sft.run(cfg, log=lambda _: None)
    finally:
        sft.final_adapter = original_final
    base = load_model(str(demo), dtype=torch.float32, device=torch.device("cpu")).eval()
    load_adapter(base, adapter)
    with torch.no_grad():
        ours = base(input_ids=captured["ids"]).logits
    assert (ours - captured["logits"]).abs().max().item() < 1e-4
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(load_model(str(demo), dtype=torch.float32, device=torch.device("cpu")), adapter)
    with torch.no_grad():
        assert (theirs.eval()(input_ids=captured["ids"]).logits - captured["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["nf4", "dora"])
def test_grpo_runs_and_resumes_exactly(tmp_path, demo, variant):
    straight = grpo.run(load_config(_grpo_config(tmp_path, demo, variant, "straight", max_steps=2)), log=lambda _: None)
    grpo.run(load_config(_grpo_config(tmp_path, demo, variant, "resumed", max_steps=1, save_steps=1)), log=lambda _: None)
    resumed = grpo.run(load_config(_grpo_config(tmp_path, demo, variant, "resumed", max_steps=2, save_steps=1)),
                       resume=True, log=lambda _: None)
    assert _same_adapters(straight, resumed) <= 1e-6
    saved = load_file(straight / "adapter_model.safetensors")
    assert any(torch.count_nonzero(v) for k, v in saved.items() if ".lora_B." in k)


@pytest.mark.parametrize("variant", ["loraplus", "pissa"])
def test_grpo_runs_with(tmp_path, demo, variant):
    adapter = grpo.run(load_config(_grpo_config(tmp_path, demo, variant, "run", max_steps=1)), log=lambda _: None)
    config = LoraConfig.from_json(adapter)  # a plain LoRA config (PiSSA converted) that loads anywhere
    assert config.init_lora_weights is True


@pytest.mark.parametrize("body, key, message", [
    ({"quantization": "nf4", "lora": {"init_lora_weights": "pissa"}}, "lora.init_lora_weights", "quantization: nf4"),
    ({"quantization": "nf4", "train": {"distributed": "fsdp2"}}, "quantization", "train.distributed: fsdp2"),
    ({"quantization": "nf4", "lora": {"modules_to_save": ["lm_head"]}}, "quantization", "lora.modules_to_save"),
    ({"quantization": "nf5"}, "quantization", "expected 'nf4' or 'fp4' or 'int8'"),
    ({"train": {"loraplus_lr_ratio": 0}}, "train.loraplus_lr_ratio", "must be a number > 0"),
    ({"lora": {"use_dora": True, "init_lora_weights": "olora"}}, "lora.init_lora_weights", "use_dora"),
    ({"lora": {"init_lora_weights": "pissa"}, "recipe": "grpo", "grpo": {"beta": 0.1}}, "lora.init_lora_weights",
     "grpo.reference: base"),
])
def test_unsupported_combinations_are_refused_naming_the_keys(tmp_path, body, key, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({"model": "m", "data": {"train": "x.jsonl"}, **body}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"'{key}'" in str(err.value) or key in str(err.value)
    assert message in str(err.value)


def test_qlora_on_a_non_linear_target_is_refused_before_training(tmp_path, demo):
    cfg = load_config(_sft_config(tmp_path, demo, "nf4", "run", max_steps=1),
                      ["lora.target_modules=[q_proj,embed_tokens]"])
    with pytest.raises(ValueError, match=r"quantization: nf4 with lora.target_modules=.*'model.embed_tokens' is a Embedding"):
        sft.run(cfg, log=lambda _: None)
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_merge_cli_dequantizes_a_qlora_base_and_says_so(tmp_path, demo):
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main
    from lorakit.lora import inject_lora, save_adapter
    from lorakit.models.quantize import quantize_model

    from .models import randomize_lora

    model = load_model(str(demo), dtype=torch.float32, device=torch.device("cpu"))
    quantize_model(model, "nf4")
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    randomize_lora(model, scale=0.05)
    save_adapter(model, tmp_path / "adapter")
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    lines = []
    import builtins

    real_print = builtins.print
    builtins.print = lambda *a, **k: lines.append(" ".join(map(str, a)))
    try:
        assert main(["merge", "--model", str(demo), "--adapter", str(tmp_path / "adapter"), "--out",
                     str(tmp_path / "merged"), "--quantization", "nf4"]) == 0
    finally:
        builtins.print = real_print
    assert any("quantized (nf4): dequantized" in line and "merging in fp32" in line for line in lines)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - expected).abs().max().item() < 1e-4

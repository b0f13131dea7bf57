"""Interop with the real `peft` package, both ways: same files, same logits."""

import pytest
import torch

from lorakit import LoraConfig, inject_lora, load_adapter, save_adapter
from lorakit.lora import ModulesToSave

from ..models import randomize_lora, tiny_gpt2, tiny_qwen3

peft = pytest.importorskip("peft")


def _peft_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = {
    "attention": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], use_rslora=True),
    "all-linear+patterns": dict(r=4, lora_alpha=16, target_modules="all-linear",
                                rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3}),
    "embedding+modules_to_save": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "gate_proj"],
                                      modules_to_save=["lm_head"]),
    "layers_to_transform": dict(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
}


def _randomize_peft(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_adapter_loads_in_lorakit(case, tmp_path, ids):
    base = tiny_qwen3()
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**CASES[case]))
    _randomize_peft(peft_model)
    expected = _peft_logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")

    ours = tiny_qwen3()
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_lorakit_saved_adapter_loads_in_peft(case, tmp_path, ids):
    kwargs = dict(CASES[case])
    kwargs["alpha"] = kwargs.pop("lora_alpha")
    ours = tiny_qwen3()
    inject_lora(ours, LoraConfig(**kwargs))
    randomize_lora(ours)
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, ModulesToSave):
                module.modules_to_save["default"].weight.mul_(1.3)
        expected = ours(ids).logits
        assert not torch.allclose(expected, tiny_qwen3()(ids).logits)
    save_adapter(ours, tmp_path / "ours")

    loaded = peft.PeftModel.from_pretrained(tiny_qwen3(), tmp_path / "ours")
    torch.testing.assert_close(_peft_logits(loaded, ids), expected, atol=1e-5, rtol=0)


def test_gpt2_conv1d_both_ways(tmp_path, ids):
    peft_model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                                  fan_in_fan_out=True))
    _randomize_peft(peft_model)
    expected = _peft_logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = tiny_gpt2()
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours")
    torch.testing.assert_close(_peft_logits(back, ids), expected, atol=1e-5, rtol=0)


def test_peft_multi_adapter_directory(tmp_path, ids):
    peft_model = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    _randomize_peft(peft_model)
    peft_model.set_adapter("other")
    expected = _peft_logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = tiny_qwen3()
    load_adapter(ours, tmp_path / "peft" / "other", adapter_name="other")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)


def test_state_dict_names_match_peft():
    ours = tiny_qwen3()
    inject_lora(ours, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]))
    theirs = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                               modules_to_save=["lm_head"]))
    prefix = "base_model.model."
    their_names = {n[len(prefix):] for n, _ in theirs.named_parameters()}
    assert {n for n, _ in ours.named_parameters()} == their_names


def test_training_matches_peft_step_for_step(ids):
    ours = tiny_qwen3()
    inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    theirs = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    prefix = "base_model.model."
    their_params = {n[len(prefix):]: p for n, p in theirs.named_parameters()}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            their_params[name].copy_(p)  # same init on both sides
    losses = {}
    for key, model in (("ours", ours), ("theirs", theirs)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        losses[key] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[key].append(loss.item())
    assert losses["ours"] == pytest.approx(losses["theirs"], abs=1e-6)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, their_params[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens", "lm_head"]])
def test_peft_adapter_saved_with_the_base_head_and_embedding_loads(tmp_path, ids, targets):
    # save_embedding_layers=True (PEFT's choice for a resized vocabulary) writes the head's and the
    # embedding's base weights next to their LoRA; the head's copy was refused as an unexpected key.
    base = tiny_qwen3()
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomize_peft(peft_model)
    with torch.no_grad():  # a "resized" head: its base weight differs from the base model's
        peft_model.base_model.model.lm_head.base_layer.weight.mul_(1.5)
    expected = _peft_logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    from safetensors.torch import load_file

    assert any(k.endswith("lm_head.base_layer.weight") for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = tiny_qwen3()
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)

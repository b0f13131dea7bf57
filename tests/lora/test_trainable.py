"""Which parameters require grad after injecting or loading adapters.

The rule under test: injecting or loading an adapter freezes the base, sets the adapter's own
parameters (LoRA A/B and its modules_to_save copies) to ``trainable``, and leaves every other
adapter's parameters as they were.
"""

import pytest
import torch

from lorakit import LoraConfig, inject_lora, load_adapter, save_adapter
from lorakit.lora import mark_trainable

from ..models import randomize_lora, tiny_qwen3

TRAIN = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
OTHER = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"])


def _grads(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _owned(model, adapter):
    """Parameter names of ``adapter``, told apart by name (independent of the code's own bookkeeping)."""
    return {n for n, _ in model.named_parameters() if f".{adapter}." in n or n.endswith(f".{adapter}")}


@pytest.fixture
def saved_other(tmp_path):
    donor = tiny_qwen3()
    inject_lora(donor, OTHER, adapter_name="default")
    randomize_lora(donor)
    save_adapter(donor, tmp_path / "other")
    return tmp_path / "other"


def test_loading_a_frozen_adapter_keeps_the_trained_one_training(saved_other, ids):
    model = tiny_qwen3()
    inject_lora(model, TRAIN, adapter_name="policy")
    trained = _owned(model, "policy")
    assert trained and {n for n, g in _grads(model).items() if g} == trained

    load_adapter(model, saved_other, adapter_name="ref", activate=False)

    assert {n for n, g in _grads(model).items() if g} == trained
    assert not any(g for n, g in _grads(model).items() if n in _owned(model, "ref"))
    # and it really trains: one step moves the policy's B, not the reference's
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.model.layers[0].self_attn.q_proj.lora_B["policy"].weight.clone()
    ref_before = model.model.layers[0].self_attn.q_proj.lora_B["ref"].weight.clone()
    model(ids).logits.square().mean().backward()
    opt.step()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.lora_B["policy"].weight, before)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_B["ref"].weight, ref_before)


def test_inject_frozen_adapter_leaves_other_adapters_as_they_were():
    model = tiny_qwen3()
    inject_lora(model, TRAIN, adapter_name="policy")
    before = _grads(model)
    inject_lora(model, OTHER, adapter_name="frozen", trainable=False)
    after = _grads(model)
    kept = [n for n in before if n in after]  # (down_proj.weight is now down_proj.base_layer.weight)
    assert len(kept) > len(before) - 3 and {n: after[n] for n in kept} == {n: before[n] for n in kept}
    assert {n for n, g in after.items() if g} == _owned(model, "policy")
    assert not any(after[n] for n in _owned(model, "frozen"))


def test_frozen_adapter_loaded_first_stays_frozen_when_a_trainable_one_follows(saved_other):
    model = tiny_qwen3()
    load_adapter(model, saved_other, adapter_name="ref", activate=False)
    inject_lora(model, TRAIN, adapter_name="policy")
    assert {n for n, g in _grads(model).items() if g} == _owned(model, "policy")


def test_a_second_trainable_adapter_does_not_freeze_the_first():
    model = tiny_qwen3()
    inject_lora(model, TRAIN, adapter_name="a")
    inject_lora(model, OTHER, adapter_name="b")
    assert {n for n, g in _grads(model).items() if g} == _owned(model, "a") | _owned(model, "b")
    # the explicit switch still chooses exactly which adapters train
    mark_trainable(model, "b")
    assert {n for n, g in _grads(model).items() if g} == _owned(model, "b")
    mark_trainable(model, ["a", "b"])
    assert {n for n, g in _grads(model).items() if g} == _owned(model, "a") | _owned(model, "b")
    mark_trainable(model, None)
    assert not any(_grads(model).values())


def test_base_is_frozen_by_any_injection_and_reloading_into_an_existing_adapter(saved_other):
    model = tiny_qwen3()
    assert all(p.requires_grad for p in model.parameters())
    inject_lora(model, OTHER, adapter_name="frozen", trainable=False)
    assert not any(_grads(model).values())
    inject_lora(model, TRAIN, adapter_name="policy")
    # reload weights into the existing trainable adapter 'frozen', then freeze it again
    load_adapter(model, saved_other, adapter_name="frozen", trainable=True, activate=False)
    assert {n for n, g in _grads(model).items() if g} == _owned(model, "policy") | _owned(model, "frozen")
    load_adapter(model, saved_other, adapter_name="frozen", activate=False)
    assert {n for n, g in _grads(model).items() if g} == _owned(model, "policy")

"""`rollout.sync: merged` as an engine receives it: checkpoint names, one layer alive at a time.

The engine here is a stand-in for vLLM's in-place reload (which needs a vLLM build): it consumes
``PolicyUpdate.weights`` as vLLM's ``load_weights`` does (lazily, dropping each weight once loaded)
and records what it saw. Oracles: transformers' ``save_pretrained`` of the base (the checkpoint's
keys) and of the model merged by ``unload_lora`` (the merged values under those keys).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch.multiprocessing.reductions import StorageWeakRef

from lorakit import LoraConfig, inject_lora, unload_lora
from lorakit.rl import PolicySampler

from ..models import MOE_FAMILIES, randomize_lora, tiny_moe


class LoadingEngine:
    """Loads merged weights one by one like vLLM's reload, tracking the bytes of those alive at once."""

    payload = "merged"

    def __init__(self, weights_dtype=None) -> None:
        self.weights_dtype = weights_dtype
        self.version = self.fingerprint = None
        self.loaded: dict[str, torch.Tensor] = {}
        self.peak_live_bytes = 0

    def sync(self, update) -> None:
        weights = update.weights if getattr(update, "weights", None) is not None else iter(update.tensors.items())
        alive: dict[int, tuple[StorageWeakRef, int]] = {}
        for name, value in weights:
            storage = value.untyped_storage()
            alive.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
            live = sum(nbytes for ref, nbytes in alive.values() if not ref.expired())
            self.peak_live_bytes = max(self.peak_live_bytes, live)
            self.loaded[name] = value.detach().clone()  # "loaded into the engine's own weights"
            del value, storage
        self.version, self.fingerprint = update.version, update.fingerprint

    def close(self) -> None:
        pass


def _adapted(family: str) -> torch.nn.Module:
    model = tiny_moe(family)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))  # attention + every expert weight
    randomize_lora(model, seed=3, scale=0.2)
    return model


def _checkpoint(model: torch.nn.Module, path) -> dict[str, torch.Tensor]:
    model.save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_merged_weights_carry_only_the_checkpoints_names(family, tmp_path):
    model = _adapted(family)
    base_keys = set(_checkpoint(tiny_moe(family), tmp_path / "base"))
    expected = _checkpoint(unload_lora(copy.deepcopy(model), merge=True), tmp_path / "merged")
    engine = LoadingEngine()
    PolicySampler(engine, model, "default").sync(0)
    assert set(engine.loaded) <= base_keys, sorted(set(engine.loaded) - base_keys)[:4]
    assert any(".experts." in k for k in engine.loaded)  # the experts' merged weights did travel
    for name, value in engine.loaded.items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)
    # every weight the merge changed reached the engine
    base = _checkpoint(tiny_moe(family), tmp_path / "base2")
    changed = {k for k in expected if k in base and not torch.equal(expected[k], base[k])}
    assert changed <= set(engine.loaded), sorted(changed - set(engine.loaded))[:4]


def test_merged_sync_streams_one_layer_at_a_time_in_the_engines_dtype(tmp_path):
    model = _adapted("qwen3_moe")
    expected = _checkpoint(unload_lora(copy.deepcopy(model), merge=True), tmp_path / "merged")
    adapted = [p for name, p in tiny_moe("qwen3_moe").named_parameters()
               if name.endswith(("proj.weight", "gate_up_proj", "down_proj"))]
    largest = max(p.numel() for p in adapted) * 2  # bytes of the largest adapted layer in bf16
    total = sum(p.numel() for p in adapted) * 2
    engine = LoadingEngine(weights_dtype=torch.bfloat16)
    PolicySampler(engine, model, "default").sync(0)
    assert all(v.dtype == torch.bfloat16 for v in engine.loaded.values())
    for name, value in engine.loaded.items():
        assert torch.equal(value, expected[name].to(torch.bfloat16)), name  # merged in fp32, cast once
    assert sum(v.numel() for v in engine.loaded.values()) * 2 == total  # every adapted layer arrived
    assert engine.peak_live_bytes <= largest < total / 4, (engine.peak_live_bytes, largest, total)


def test_lora_sync_hands_vllm_the_per_expert_layout_it_reads(tmp_path):
    """vLLM reads Qwen3-MoE/Mixtral/DeepSeek expert LoRA per expert: the rollout's hand-over is the
    file ``lorakit export-adapter --format vllm`` writes (tested there against each expert's update)."""
    import json

    from lorakit import save_adapter
    from lorakit.lora import final_adapter, read_adapter, write_adapter
    from lorakit.lora.vllm_format import export_per_expert
    from lorakit.lora.vllm_format import vllm_adapter, vllm_reads_3d_moe

    model = _adapted("qwen3_moe")
    save_adapter(model, tmp_path / "fused")
    _, expected, _ = read_adapter(export_per_expert(tmp_path / "fused", tmp_path / "exported"))
    config, tensors = final_adapter(model, "default")
    written = write_adapter(tmp_path / "handed", *vllm_adapter(config, tensors, experts_3d=False))
    handed_config, handed, _ = read_adapter(written)
    assert handed.keys() == expected.keys() and any(".experts.3.up_proj." in k for k in handed)
    assert all(torch.equal(handed[k], expected[k]) for k in expected)
    assert not handed_config.target_parameters and "gate_proj" in handed_config.target_modules
    # 3-D readers (gpt-oss, Qwen3.5-MoE) get PEFT's layout unchanged
    assert vllm_adapter(config, tensors, experts_3d=True) == (config, tensors)
    for family, reads_3d in (("qwen3_moe", False), ("mixtral", False), ("gpt_oss", True)):
        config = tiny_moe(family).config
        config.architectures = [type(tiny_moe(family)).__name__]  # what save_pretrained writes
        config.save_pretrained(tmp_path / family)
        assert vllm_reads_3d_moe(object(), str(tmp_path / family)) is reads_3d, family  # no registry: the list

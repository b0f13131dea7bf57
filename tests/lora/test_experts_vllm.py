"""MoE adapters for vLLM: `inspect --check vllm` explains the expert layout; `export-adapter` splits it per expert."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, inject_lora, merge_lora, save_adapter
from lorakit.cli import main
from tests.models import randomize_lora, tiny_moe

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _saved(tmp_path, **kwargs):
    model = tiny_moe("qwen3_moe")
    inject_lora(model, LoraConfig(alpha=16, **kwargs))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad")
    return model, tmp_path / "ad"


def test_inspect_reports_experts_and_what_vllm_accepts(tmp_path, capsys):
    _, path = _saved(tmp_path, r=8, target_modules=["q_proj"], target_parameters=EXPERTS)
    assert main(["inspect", str(path), "--check", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "expert parameters: 4 (4 experts x4" in out
    assert "model.layers.0.mlp.experts.base_layer  r=8" in out  # per-expert rank, not experts * r
    assert "is_3d_moe_weight" in out and "export-adapter" in out
    assert "vLLM check: OK" in out


def test_check_vllm_refuses_router_and_half_expert_adapters(tmp_path, capsys):
    _, router = _saved(tmp_path / "a", r=8, target_modules=[], target_parameters=EXPERTS + ["mlp.gate.weight"])
    assert main(["inspect", str(router), "--check", "vllm"]) == 1
    assert "vLLM serves no router adapter" in capsys.readouterr().out

    _, half = _saved(tmp_path / "b", r=8, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    assert main(["inspect", str(half), "--check", "vllm"]) == 1
    assert "both the gate/up and the down projection" in capsys.readouterr().out


def test_export_per_expert_reproduces_each_experts_update(tmp_path, capsys):
    model, path = _saved(tmp_path, r=8, target_modules=["q_proj"], target_parameters=EXPERTS,
                         rank_pattern={"down_proj": 16}, alpha_pattern={"down_proj": 8})
    experts = model.model.layers[1].mlp.experts.base_layer.base_layer
    base_gate_up, base_down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    merge_lora(model)  # the oracle: what each expert's weight became
    d_gate_up, d_down = experts.gate_up_proj.detach() - base_gate_up, experts.down_proj.detach() - base_down

    assert main(["export-adapter", str(path), str(tmp_path / "vllm"), "--format", "vllm"]) == 0
    tensors = load_file(str(tmp_path / "vllm" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.mlp.experts"
    inter = d_gate_up.shape[1] // 2
    for e in range(4):
        def update(proj, scale):
            a, b = tensors[f"{prefix}.{e}.{proj}.lora_A.weight"], tensors[f"{prefix}.{e}.{proj}.lora_B.weight"]
            return b @ a * scale
        assert torch.allclose(update("gate_proj", 16 / 8), d_gate_up[e, :inter], atol=1e-5)
        assert torch.allclose(update("up_proj", 16 / 8), d_gate_up[e, inter:], atol=1e-5)
        assert torch.allclose(update("down_proj", 8 / 16), d_down[e], atol=1e-5)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in tensors
    assert not any(".experts.lora_" in k or "base_layer" in k for k in tensors)

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "vllm"), "--check", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "per-expert layout" in out and "r=16 x8" in out

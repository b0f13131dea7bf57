"""MoE adapters for vLLM: `inspect --check vllm` explains the expert layout; `export-adapter` splits it per expert."""

from __future__ import annotations

import pytest
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
    assert "CPU build (0.32.0) cannot run an MoE model with LoRA enabled" in out  # what is and is not verified
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


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_per_expert_layout_imports_back_to_peft_layout(tmp_path, capsys, family):
    """vLLM's per-expert layout -> PEFT's fused layout gives back the same tensors and logits; the
    real peft loads the result (Qwen2-MoE: its shared expert's gate/up/down stay module targets)."""
    peft = pytest.importorskip("peft")
    from lorakit import load_adapter
    from lorakit.lora.io import read_adapter

    model = tiny_moe(family)
    inject_lora(model, LoraConfig(r=4, alpha=16, target_modules="all-linear", rank_pattern={"down_proj": 8}))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad")
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    assert main(["export-adapter", str(tmp_path / "ad"), str(tmp_path / "vllm"), "--format", "vllm"]) == 0
    assert main(["export-adapter", str(tmp_path / "vllm"), str(tmp_path / "back"), "--format", "peft"]) == 0
    assert "fused target_parameters layout" in capsys.readouterr().out
    original, back = read_adapter(tmp_path / "ad"), read_adapter(tmp_path / "back")
    assert back[1].keys() == original[1].keys()
    assert all(torch.equal(back[1][k], original[1][k]) for k in original[1])
    assert back[0].target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    fresh = tiny_moe(family)
    load_adapter(fresh, tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, atol=1e-5, rtol=0)
        peft_model = peft.PeftModel.from_pretrained(tiny_moe(family), str(tmp_path / "back"))
        torch.testing.assert_close(peft_model(ids).logits, expected, atol=1e-4, rtol=0)


def test_per_expert_import_refuses_gate_and_up_with_different_a(tmp_path):
    from lorakit.lora.io import read_adapter, write_adapter
    from lorakit.lora.vllm_format import export_per_expert, import_per_expert

    _, path = _saved(tmp_path, r=4, target_modules=[], target_parameters=EXPERTS)
    export_per_expert(path, tmp_path / "vllm")
    config, tensors, _ = read_adapter(tmp_path / "vllm")
    key = "model.layers.0.mlp.experts.2.up_proj.lora_A.weight"
    tensors[key] = tensors[key] + 1
    write_adapter(tmp_path / "odd", config, {"base_model.model." + k: v for k, v in tensors.items()})
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.experts.2.gate_proj' and '.up_proj' have different lora_A"):
        import_per_expert(tmp_path / "odd", tmp_path / "never")
    assert not (tmp_path / "never").exists()

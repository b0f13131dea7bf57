"""Megatron-core MoE: LoRA on SequentialMLP experts with expert parallelism (real torchrun, gloo, CPU).

tests/megatron_moe_worker.py runs with 2 ranks (EP=2: each rank holds 2 of the 4 experts), with 2
ranks in expert tensor parallelism (TP = expert-TP = 2, EP=1: every expert split over both ranks,
the fc2 partial sums reduced by Megatron's dispatcher) and with 1 rank; the tests assert on what
they recorded. The oracle for the expert layout
is the HF Qwen3-MoE model the Megatron model is built from, with the exported adapter loaded by
the real `peft` (and by lorakit), and an adapter made by peft imported into Megatron.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

import lorakit  # noqa: E402
from lorakit import LoraConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "megatron_moe_worker.py"


def _torchrun(out: Path, nproc: int, *extra: str) -> None:
    src = str(Path(lorakit.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron_moe")
    _torchrun(out, 2)
    _torchrun(out, 2, "--etp")
    _torchrun(out, 1, "--other-layout", str(out / "ep2" / "ckpt"))
    results = {}
    for run, rank in (("ep2", 0), ("ep2", 1), ("etp2", 0), ("etp2", 1), ("ep1", 0)):
        data = json.loads((out / run / f"results_rank{rank}.json").read_text())
        assert "error" not in data, data["error"]
        results[(run, rank)] = data
    return out, results


def test_megatron_moe_model_matches_hf_and_lora_covers_experts_not_router(runs):
    for key, r in runs[1].items():
        assert r["conversion_covers_all_keys"] and r["base_vs_hf_logits"] <= 1e-5, key
        assert r["only_lora_trainable"] and r["router_not_wrapped"]
        # 2 layers x fc1/fc2 x local experts (4 experts over EP ranks)
        assert r["local_expert_layers"] == 2 * 2 * (2 if key[0] == "ep2" else 4)
        assert r["expert_lora_allreduce"] == (key[0] != "ep2")  # expert-parallel weights: Megatron's DDP flag
        assert "MoE router (TopKRouter)" in r["router_target_error"] and "decoder.layers.0.mlp.router" in r["router_target_error"]
        assert r["fresh_lora_is_noop"] == 0.0 and r["lora_changes_logits"] > 1e-2
    text = runs[1][("ep2", 0)]["report_text"]
    assert "Applied LoRA to: decoder.layers.0.mlp.experts.local_experts.1.linear_fc2" in text
    from tests.models import tiny_moe

    # model-wide counts are the same at every parallel layout (each EP rank holds half the experts)
    hf_params = sum(p.numel() for p in tiny_moe("qwen3_moe", experts=4, top_k=2).parameters())
    lora = 2 * 8 * ((32 + 64) + (32 + 32)) + 2 * 8 * 4 * ((32 + 32) + (16 + 32))  # r=8: qkv, proj; 4 experts fc1, fc2
    for key in [k for k in runs[1] if k[1] == 0]:  # global rank 0 prints the report
        assert f"Total parameters: {hf_params + lora:,}" in runs[1][key]["report_text"], key
        assert f"Trainable parameters: {lora:,}" in runs[1][key]["report_text"], key


@pytest.mark.parametrize("run", ["ep1", "ep2", "etp2"])
def test_export_to_peft_target_parameters_and_back(runs, run):
    r = runs[1][(run, 0)]
    # Megatron -> PEFT target_parameters layout -> peft / lorakit on the HF Qwen3-MoE: same logits (fp32)
    assert r["export_peft_vs_megatron"] <= 1e-4 and r["export_lorakit_vs_megatron"] <= 1e-4
    cfg = r["export_config"]
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # what `lorakit inspect --check vllm` would say: nothing vLLM refuses (no router, gate/up and down)
    from lorakit.lora.describe import describe_adapter
    from lorakit.lora.vllm_format import vllm_problems

    assert vllm_problems(describe_adapter(runs[0] / run / "adapter")) == []
    for rank in range(1 if run == "ep1" else 2):
        rr = runs[1][(run, rank)]
        assert rr["import_equal"] and rr["import_logits"] == 0.0  # and back: the same expert shards
        assert rr["peft_made_vs_megatron"] <= 1e-4  # an adapter peft made (rsLoRA, experts + o_proj)
        assert rr["reload_exact"] and rr["merge_logits"] <= 1e-5
    assert r["offline_export_equal"]


def test_expert_parallel_export_equals_single_rank(runs):
    from safetensors.torch import load_file

    out = runs[0]
    one = load_file(str(out / "ep1" / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight" in one  # gate_up_proj's
    for run in ("ep2", "etp2"):
        other = load_file(str(out / run / "adapter" / "adapter_model.safetensors"))
        assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one), run
    assert (out / "ep2" / "ckpt" / "mp_rank_00_000_001" / "adapter_shard.safetensors").is_file()
    # an EP=2 checkpoint into an EP=1 model: refused before any weight changes, saying what to do
    err = runs[1][("ep1", 0)]["other_ep_refused"]
    assert "saved with expert-parallel size 2, this model runs 1" in err and "import_hf_adapter" in err
    assert runs[1][("ep1", 0)]["other_ep_left_weights"]


def test_training_steps_change_only_lora(runs):
    for key, r in runs[1].items():
        assert r["train_losses"][-1] < r["train_losses"][0], (key, r["train_losses"])
        assert r["train_base_unchanged"] and r["train_every_expert_lora_changed"]
        # every LoRA gradient equals what Megatron's own gradient of that layer's weight implies
        assert r["lora_grad_vs_weight_grad"] <= 1e-5, key
    # EP=2 (each rank its experts, dense LoRA averaged over the 2 data-parallel replicas) == EP=1.
    # (Not TP=2: without sequence parallelism Megatron's dispatcher feeds every expert each token
    # once per TP rank, doubling the experts' weight gradients; Megatron refuses to train so.)
    assert runs[1][("ep2", 0)]["train_losses"] == pytest.approx(runs[1][("ep1", 0)]["train_losses"], abs=1e-5)


class GroupedMLP(torch.nn.Module):
    """Stands in for megatron-core's grouped-GEMM experts (its constructor needs the CUDA
    grouped_gemm kernels): only the class name matters to the refusal."""

    def __init__(self) -> None:
        super().__init__()
        self.weight1 = torch.nn.Parameter(torch.zeros(8, 8))


def test_grouped_gemm_experts_are_refused_not_skipped():
    from lorakit.integrations.megatron import apply_lora_to_megatron_model

    model = torch.nn.ModuleDict({"decoder": torch.nn.ModuleDict({"mlp": torch.nn.ModuleDict({"experts": GroupedMLP()})})})
    for targets in ("all-linear", ["linear_fc1"]):
        with pytest.raises(ValueError, match=r"'decoder.mlp.experts' .*GroupedMLP: grouped-GEMM MoE experts"):
            apply_lora_to_megatron_model(model, LoraConfig(r=2, target_modules=targets), log=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="grouped-GEMM experts need CUDA (Transformer Engine)")
def test_gpu_real_grouped_gemm_experts_are_refused(tmp_path):
    """On a device: megatron-core's own TEGroupedMLP (moe_grouped_gemm=True) is refused, naming it."""
    pytest.importorskip("transformer_engine")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from lorakit.integrations.megatron import apply_lora_to_megatron_model

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ps.initialize_model_parallel(1)
        model_parallel_cuda_manual_seed(0)
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                   num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_grouped_gemm=True,
                                   gated_linear_unit=True, add_bias_linear=False, bf16=True, params_dtype=torch.bfloat16)
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=4, moe_grouped_gemm=True)
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=64).cuda()
        with pytest.raises(ValueError, match=r"'decoder.layers.0.mlp.experts' .*: grouped-GEMM MoE experts"):
            apply_lora_to_megatron_model(model, LoraConfig(r=4, target_modules="all-linear"), log=False)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()

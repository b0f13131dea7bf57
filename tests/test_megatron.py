"""Megatron-core tensor-parallel LoRA (lorakit.integrations.megatron) on real torchrun processes.

One launch of tests/megatron_worker.py with 2 ranks (TP=2, gloo on CPU) and one with 1 rank (TP=1)
compute every check; the tests below assert on what they recorded. The TP=1 run also reloads the
TP=2 checkpoint (resharding) and the two exports are compared with each other.
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
from lorakit.integrations.megatron_hf import ModuleInfo, from_hf_adapter, fuse_qkv, split_qkv, to_hf_adapter  # noqa: E402
from lorakit.lora.parallel import shard_tensor, unshard_tensor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "megatron_worker.py"
TOL = 1e-5


def _torchrun(out: Path, nproc: int, *extra: str, device: str = "cpu") -> None:
    # The workers import the same lorakit as this process (the tree under test).
    src = str(Path(lorakit.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), "--out", str(out), "--device", device, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _results(out: Path, tp: int, rank: int) -> dict:
    data = json.loads((out / f"tp{tp}" / f"results_rank{rank}.json").read_text())
    assert "error" not in data, data["error"]
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron")
    _torchrun(out, 2)
    _torchrun(out, 1, "--reshard-from", str(out / "tp2" / "ckpt"))
    return out, {(tp, rank): _results(out, tp, rank) for tp, rank in ((2, 0), (2, 1), (1, 0))}


@pytest.mark.parametrize("layer", ["column", "column_sp", "row", "row_sp"])
def test_tp2_layer_matches_dense_reference(runs, layer):
    # float64 on both sides: outputs, input grads and LoRA grads agree to the last bits
    for rank in (0, 1):
        r = runs[1][(2, rank)]
        for what in ("out", "input_grad", "A_grad", "B_grad"):
            assert r[f"layer_{layer}_{what}"] <= TOL, (rank, what, r[f"layer_{layer}_{what}"])
        assert r[f"layer_{layer}_returns_pair"] and r[f"layer_{layer}_bias_passthrough"]
        assert r[f"layer_{layer}_base_frozen"]
        # merged shards == the dense merge's shards; merge keeps outputs, unmerge restores the weight
        assert r[f"layer_{layer}_merged_weight"] <= TOL
        assert r[f"layer_{layer}_merged_out"] <= TOL
        # disabled while merged: the base layer's output, computed without rewriting the weight
        assert r[f"layer_{layer}_disabled_merged_out"] <= TOL
        assert r[f"layer_{layer}_disabled_keeps_weight"]
        assert r[f"layer_{layer}_unmerged_weight"] <= TOL


@pytest.mark.parametrize("tp", [1, 2])
def test_gpt_model_from_hf_qwen3_and_exported_adapter(runs, tp):
    r = runs[1][(tp, 0)]
    assert r["gpt_conversion_covers_all_keys"]
    assert r["gpt_base_vs_hf_logits"] <= 1e-5  # the qkv grouping / [gate; up] conversion is right
    assert r["gpt_fresh_lora_is_noop"] == 0.0
    assert r["gpt_lora_changes_logits"] > 1e-2
    # the exported adapter, loaded into the HF model by lorakit and by PEFT, reproduces Megatron
    assert r["export_lorakit_vs_megatron_logits"] <= 1e-5
    assert r["export_peft_vs_megatron_logits"] <= 1e-5
    cfg = r["export_config"]
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"], cfg["task_type"]) == (8, 16, "LORA", "CAUSAL_LM")
    assert r["offline_export_equal"]
    # nothing in it that vLLM would refuse (the check behind `lorakit inspect --check vllm`)
    from lorakit.lora.describe import describe_adapter
    from lorakit.lora.vllm_format import vllm_problems

    assert vllm_problems(describe_adapter(runs[0] / f"tp{tp}" / "adapter")) == []
    # Megatron dist-checkpoint entries: base keys as without LoRA; qkv B split on rows, proj A on columns
    assert r["dist_ckpt_base_keys_unchanged"]
    # (the leading axis of 2 is the layer index Megatron prepends)
    assert r["dist_ckpt_lora_layout"] == [[2, 64, 8], [2, tp, 1], [2, 8, 32], [2, 1, tp], "ShardedTensorFactory"]


def test_apply_report_and_freezing(runs):
    tp2, tp1 = runs[1][(2, 0)], runs[1][(1, 0)]
    from tests.models import tiny_qwen3

    hf_params = sum(p.numel() for p in tiny_qwen3().parameters())
    lora_params = 2 * 8 * ((32 + 64) + (32 + 32) + (32 + 128) + (64 + 32))  # 2 layers, r=8: qkv, proj, fc1, fc2
    for r in (tp1, tp2):
        assert r["gpt_global_total"] == hf_params + lora_params
        assert r["gpt_global_trainable"] == lora_params
        assert r["gpt_wrapped"] == 8 and r["gpt_only_lora_trainable"]
        text = r["gpt_report_text"]
        assert "Applied LoRA to: decoder.layers.1.mlp.linear_fc2" in text
        assert f"Trainable parameters: {lora_params:,}" in text and "Target modules:" in text
    assert tp2["gpt_rank_trainable"] < lora_params  # B of column / A of row layers are split
    err = tp2["gpt_bad_target_error"]
    assert "matched no tensor-parallel linear layer" in err and "linear_qkv" in err and "ColumnParallelLinear" in err


@pytest.mark.parametrize("tp", [1, 2])
def test_checkpoints_base_load_import_merge(runs, tp):
    for rank in range(tp):
        r = runs[1][(tp, rank)]
        # LoRA-free base checkpoint into an injected model: base keys land on base_layer, LoRA is fresh
        assert r["base_load_fresh_lora"] == 16 and r["base_load_logits"] == 0.0
        assert "missing base key 'decoder.layers.1.mlp.linear_fc2.base_layer.weight'" in r["base_load_missing_key_error"]
        assert r["reload_same_tp_exact"] and r["reload_logits"] == 0.0
        assert r["import_equal"] and r["import_logits"] == 0.0
        assert "cannot be represented exactly" in r["import_refused"] and "v_proj" in r["import_refused"]
        assert r["import_refused_leaves_no_adapter"]
        assert r["merge_logits"] <= 1e-5 and r["unmerge_base_restored"] <= 1e-5


def test_tp2_checkpoint_reloads_on_tp1_and_exports_match(runs):
    out, results = runs
    assert results[(1, 0)]["reshard_logits"] <= 1e-5
    from safetensors.torch import load_file

    one = load_file(str(out / "tp1" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(out / "tp2" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys() and len(one) == 2 * 2 * 7
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert (out / "tp2" / "ckpt" / "mp_rank_01_000" / "adapter_shard.safetensors").is_file()


def test_training_a_few_steps(runs):
    for key, r in runs[1].items():
        losses = r["train_losses"]
        assert losses[-1] < losses[0], (key, losses)
        assert r["train_base_unchanged"] and r["train_replicated_in_sync"]


def test_offline_export_cli(runs, tmp_path):
    out, _ = runs
    src = str(Path(lorakit.__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-m", "lorakit.integrations.megatron", "export", str(out / "tp2" / "ckpt"),
                           str(tmp_path / "a")], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "lorakit.integrations.megatron", "export", str(tmp_path),
                          str(tmp_path / "b")], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})
    assert bad.returncode == 1 and "lora_meta.json" in bad.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_gpt_model_trains_with_lora(tmp_path):
    nproc = min(2, torch.cuda.device_count())
    _torchrun(tmp_path, nproc, "--train-only", device="cuda")
    for rank in range(nproc):
        r = _results(tmp_path, nproc, rank)
        assert r["train_losses"][-1] < r["train_losses"][0], r["train_losses"]
        assert r["train_base_unchanged"] and r["train_replicated_in_sync"]


# --- pure layout functions (no processes) ---------------------------------------------------------
def test_qkv_split_and_fuse_round_trip():
    heads, groups, d, r = 4, 2, 3, 5
    rows = torch.arange(groups * (heads // groups + 2) * d * r, dtype=torch.float32).reshape(-1, r)
    q, k, v = split_qkv(rows, heads, groups, d)
    assert q.shape == (heads * d, r) and k.shape == (groups * d, r) and v.shape == (groups * d, r)
    # group 0 = [q head 0, q head 1, k head 0, v head 0]
    assert torch.equal(q[: 2 * d], rows[: 2 * d]) and torch.equal(k[:d], rows[2 * d: 3 * d])
    assert torch.equal(v[:d], rows[3 * d: 4 * d]) and torch.equal(q[2 * d: 4 * d], rows[4 * d: 6 * d])
    assert torch.equal(fuse_qkv(q, k, v, heads, groups, d), rows)


def test_strided_shards_are_megatron_gate_up_layout():
    full = torch.arange(8).reshape(8, 1)  # [gate 0..3; up 4..7]
    shards = [shard_tensor(full, 0, rank, 2, stride=2) for rank in range(2)]
    assert shards[0].flatten().tolist() == [0, 1, 4, 5] and shards[1].flatten().tolist() == [2, 3, 6, 7]
    assert torch.equal(unshard_tensor(shards, 0, stride=2), full)


def _qkv_info():
    return ModuleInfo(key="model0.decoder.layers.0.self_attention.linear_qkv", role="qkv", layer=0,
                      parallel_mode="column", in_features=6, out_features=16, partition_stride=1, r=2, alpha=4.0,
                      use_rslora=False, num_heads=4, num_query_groups=2, head_dim=2)


def test_import_refuses_unrepresentable_qkv_and_zero_fills_missing_projections():
    info = _qkv_info()
    a, b = torch.randn(2, 6), torch.randn(16, 2)
    cfg, tensors = to_hf_adapter([(info, a, b)], LoraConfig(r=2, alpha=4, target_modules=["linear_qkv"]))
    plain = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    got_a, got_b, r, alpha = from_hf_adapter(info, cfg, plain, "x")
    assert torch.equal(got_a, a) and torch.equal(got_b, b) and (r, alpha) == (2, 4.0)
    # k_proj left out: its B rows are zero
    no_k = {k: v for k, v in plain.items() if ".k_proj." not in k}
    _, b_no_k, _, _ = from_hf_adapter(info, cfg, no_k, "x")
    q, k, v = split_qkv(b_no_k, 4, 2, 2)
    assert not k.any() and torch.equal(q, split_qkv(b, 4, 2, 2)[0])
    # different A on q and v: one fused A cannot represent it
    plain["model.layers.0.self_attn.v_proj.lora_A.weight"] = torch.randn(2, 6)
    with pytest.raises(ValueError, match="cannot be represented exactly"):
        from_hf_adapter(info, cfg, plain, "x")


def test_seed_flags_make_a_config():
    import argparse

    from lorakit.integrations.megatron import add_lora_arguments, custom_megatron_init

    parser = add_lora_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--use-lora", "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0.05",
                              "--lora-target-modules", "linear_qkv", "linear_proj", "--lora-only-trainable"])
    cfg = custom_megatron_init(args)
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules) == (16, 32.0, 0.05, ["linear_qkv", "linear_proj"])
    assert args.lora_config is cfg
    assert custom_megatron_init(parser.parse_args([])) is None
    with pytest.raises(ValueError, match="LoRA flags: .*r must be a positive integer"):
        custom_megatron_init(parser.parse_args(["--use-lora", "--lora-r", "0"]))


class TELayerNormColumnParallelLinear(torch.nn.Module):
    """Stands in for Transformer Engine's fused norm + column-parallel linear (TE needs CUDA): TE's
    attribute names (``normalization``, ``eps``, ``zero_centered_gamma``, ``layer_norm_weight``/``_bias``),
    TP size 1, returns (output, None) like Megatron's TE wrapper. The norm is torch's own."""

    def __init__(self, d_in: int, d_out: int, normalization: str, zero_centered_gamma: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.parallel_mode = d_in, d_out, "column"
        self.tp_group, self.sequence_parallel, self.normalization, self.eps = None, False, normalization, 1e-6
        self.zero_centered_gamma = zero_centered_gamma
        self.layer_norm_weight = torch.nn.Parameter(torch.rand(d_in) + 0.5)
        self.layer_norm_bias = torch.nn.Parameter(torch.randn(d_in)) if normalization == "LayerNorm" else None
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in))

    def norm_module(self) -> torch.nn.Module:
        """The same norm as a separate torch module (zero-centred gamma stores weight - 1)."""
        gamma = self.layer_norm_weight.detach() + (1 if self.zero_centered_gamma else 0)
        if self.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(self.in_features, eps=self.eps)
        else:
            norm = torch.nn.LayerNorm(self.in_features, eps=self.eps)
            norm.bias.data.copy_(self.layer_norm_bias.detach())
        norm.weight.data.copy_(gamma)
        return norm

    def forward(self, x):
        return torch.nn.functional.linear(self.norm_module()(x), self.weight), None


@pytest.mark.parametrize("normalization, zero_centered", [("RMSNorm", False), ("RMSNorm", True), ("LayerNorm", False),
                                                          ("LayerNorm", True)])
def test_fused_norm_linear_feeds_the_normed_input_to_lora(normalization, zero_centered):
    """Oracle: the unfused model (torch's norm, then a Linear with the same LoRA put in by ``peft``)."""
    peft = pytest.importorskip("peft")
    from lorakit.integrations.megatron import NormedInputLoraLinear, apply_lora_to_megatron_model

    torch.manual_seed(0)
    fused = TELayerNormColumnParallelLinear(8, 12, normalization, zero_centered)
    holder = torch.nn.ModuleDict({"linear_qkv": fused})
    apply_lora_to_megatron_model(holder, LoraConfig(r=2, alpha=4, target_modules=["linear_qkv"],
                                                    init_lora_weights=False), log=False)
    layer = holder["linear_qkv"]
    assert isinstance(layer, NormedInputLoraLinear)
    linear = torch.nn.Linear(8, 12, bias=False)
    linear.weight.data.copy_(fused.weight.detach())
    unfused = peft.get_peft_model(torch.nn.Sequential(fused.norm_module(), linear),
                                  peft.LoraConfig(r=2, lora_alpha=4, target_modules=["1"]))
    unfused.base_model.model[1].lora_A["default"].weight.data.copy_(layer.lora_A["default"].weight.detach())
    unfused.base_model.model[1].lora_B["default"].weight.data.copy_(layer.lora_B["default"].weight.detach())
    x = torch.randn(3, 2, 8) * 3 + 1
    with torch.no_grad():
        out, bias = layer(x)
        expected = unfused(x)
        base_only = fused(x)[0]
    assert bias is None
    assert not torch.allclose(out, base_only, atol=1e-3)  # the LoRA branch contributes
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

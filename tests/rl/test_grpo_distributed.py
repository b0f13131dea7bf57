"""GRPO on real torchrun processes (CPU, gloo, 2 ranks): rollouts sharded by rank, same result as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from lorakit.models import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


def _run(cfg, nproc, *overrides):
    cmd = [sys.executable, "-m", "lorakit", "train", str(cfg), *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lorakit", "train", str(cfg), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _steps(out):
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "reward_mean" in r}


# log_kl off: zero-advantage sequences are skipped, and each rank runs as many micro-batches as the
# others (a rank with fewer to train tops up with skipped ones, or the collectives would hang).
@pytest.mark.parametrize("mode, log_kl", [("ddp", True), ("fsdp2", False)])
def test_two_ranks_match_one_process(tmp_path, demo, mode, log_kl):
    reward = "tests.rl.rewards_for_tests:odd_chars" + ("" if log_kl else "_on_even_prompts")
    body = {"recipe": "grpo", "model": str(demo), "output_dir": str(tmp_path / "single"),
            "data": {"train": str(ROOT / "examples" / "data" / "arith_rl.jsonl")},
            "lora": {"r": 4, "alpha": 8},
            "grpo": {"prompts_per_step": 4, "num_iterations": 2, "log_kl": log_kl,
                     "rewards": {"numeric_match": 1.0, reward: 0.1}},
            "rollout": {"num_generations": 4, "max_new_tokens": 4},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 2e-4, "seed": 5, "warmup_ratio": 0.0}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(body))
    _run(cfg, 1)
    log = _run(cfg, 2, f"output_dir={tmp_path / mode}", f"train.distributed={mode}", "train.batch_size=2")
    assert f"{mode} x 2" in log
    single, dist = _steps(tmp_path / "single"), _steps(tmp_path / mode)
    assert sorted(single) == sorted(dist) == [1, 2]
    for step in single:  # the same completions were drawn, scored and normalised over both ranks (fp32 sums)
        for key in ("reward_mean", "completion_len", "zero_std_frac"):
            assert single[step][key] == pytest.approx(dist[step][key], abs=1e-6), (step, key)
        assert single[step]["loss"] == pytest.approx(dist[step]["loss"], abs=1e-5)
        if log_kl:
            assert single[step]["kl"] == pytest.approx(dist[step]["kl"], abs=1e-6)
    if not log_kl:
        assert any(single[step]["skipped_frac"] > 0 for step in single)
    a = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / mode / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # it did train


def test_fsdp2_local_rollouts_with_fewer_held_out_prompts_than_ranks_finish(tmp_path, demo):
    # One held-out prompt on two ranks: rank 1 has none to complete, yet FSDP2's sharded forwards
    # are collectives, so it must still join rank 0's sampling (it used to skip it and hang).
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "3+4=", "answer": "7"}) + "\n")
    body = {"recipe": "grpo", "model": str(demo), "output_dir": str(tmp_path / "out"),
            "data": {"train": str(ROOT / "examples" / "data" / "arith_rl.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
            "lora": {"r": 4, "alpha": 8}, "grpo": {"prompts_per_step": 2},
            "rollout": {"num_generations": 2, "max_new_tokens": 3},
            "train": {"max_steps": 1, "batch_size": 2, "seed": 5, "distributed": "fsdp2", "dist_timeout_s": 60}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(body))
    _run(cfg, 2)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 1]  # before and after training

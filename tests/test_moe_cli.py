"""SFT and GRPO through the CLI on the tiny MoE demo model: experts get adapters that PEFT loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lorakit.lora import load_adapter
from lorakit.models import load_model

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


@pytest.fixture(scope="module")
def moe_demo(tmp_path_factory):
    from lorakit.models import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo-moe", moe=True)


def _train(tmp_path, body):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(body))
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", str(cfg)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _check_adapter(adapter: Path, demo: Path) -> None:
    peft = pytest.importorskip("peft")
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == EXPERTS
    ids = torch.tensor([[40, 41, 42, 43, 44, 45]])
    ours = load_model(str(demo)).eval()
    load_adapter(ours, adapter)
    theirs = peft.PeftModel.from_pretrained(load_model(str(demo)).eval(), str(adapter)).eval()
    base = load_model(str(demo)).eval()
    with torch.no_grad():
        want = ours(ids).logits
        assert torch.allclose(theirs(ids).logits, want, atol=1e-4)
        assert not torch.allclose(base(ids).logits, want, atol=1e-4)  # the experts' adapters trained


def test_sft_cli_trains_expert_lora(tmp_path, moe_demo):
    body = {"recipe": "sft", "model": str(moe_demo), "output_dir": str(tmp_path / "run"),
            "data": {"train": str(ROOT / "examples" / "data" / "identity.jsonl")},
            "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 0, "warmup_ratio": 0.0}}
    out = _train(tmp_path, body)
    assert "mlp.experts.gate_up_proj" in out  # the start-up report says the experts are covered
    _check_adapter(tmp_path / "run" / "adapter", moe_demo)


def test_grpo_cli_trains_expert_lora(tmp_path, moe_demo):
    body = {"recipe": "grpo", "model": str(moe_demo), "output_dir": str(tmp_path / "run"),
            "data": {"train": str(ROOT / "examples" / "data" / "arith_rl.jsonl")},
            "lora": {"r": 4, "alpha": 8, "target_modules": [], "target_parameters": EXPERTS},
            "grpo": {"prompts_per_step": 2, "rewards": {"numeric_match": 1.0, "tests.rl.rewards_for_tests:odd_chars": 0.1}},
            "rollout": {"num_generations": 4, "max_new_tokens": 4, "temperature": 3.0},  # the untrained demo MoE is peaked: a flat sampler gives every group a reward spread
            "train": {"max_steps": 2, "batch_size": 4, "lr": 5e-2, "seed": 3, "warmup_ratio": 0.0}}
    out = _train(tmp_path, body)
    assert "mlp.experts.gate_up_proj" in out
    _check_adapter(tmp_path / "run" / "adapter", moe_demo)

"""GRPO in fp16 scales its loss (a GradScaler, as SFT) and a resumed run continues exactly: the
scaler's state is in the checkpoint. Needs a CUDA device (fp16 autocast is refused on CPU)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs a CUDA device")]


def _run(cfg, *overrides):
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", str(cfg), *overrides], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _steps(out):
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "reward_mean" in r}


def test_fp16_grpo_resumes_exactly(tmp_path):
    from lorakit.models import write_demo_model

    demo = write_demo_model(tmp_path / "demo")
    body = {"recipe": "grpo", "model": str(demo), "output_dir": str(tmp_path / "ref"),
            "data": {"train": str(ROOT / "examples" / "data" / "arith_rl.jsonl")}, "lora": {"r": 4, "alpha": 8},
            "grpo": {"prompts_per_step": 2, "num_iterations": 2},
            "rollout": {"num_generations": 4, "max_new_tokens": 4},
            "train": {"max_steps": 4, "save_steps": 2, "batch_size": 4, "lr": 1e-3, "seed": 5, "warmup_ratio": 0.0,
                      "dtype": "fp16", "device": "cuda"}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(body))
    _run(cfg)
    assert (tmp_path / "ref" / "checkpoint-2" / "scaler.json").is_file()
    scale = json.loads((tmp_path / "ref" / "checkpoint-2" / "scaler.json").read_text())["scale"]
    assert scale > 1.0  # the loss was scaled
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "ref" / "checkpoint-2", resumed / "checkpoint-2")
    _run(cfg, f"output_dir={resumed}", "--resume")
    ref, got = _steps(tmp_path / "ref"), _steps(resumed)
    for step in (3, 4):
        for key in ("reward_mean", "completion_len", "loss"):
            assert got[step][key] == pytest.approx(ref[step][key], abs=1e-5), (step, key)

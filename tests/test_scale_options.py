"""Settings for models larger than one device (train.fsdp_replicate, train.cpu_offload,
train.attn_implementation) and fp16 loss scaling: bad input is refused before any weight is read,
and the gradient scaler's state survives a checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.config import ConfigError, load_config
from lorakit.models.attention import resolve_attention
from lorakit.recipes.sft import run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "identity.jsonl"


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A model dir whose weights file is garbage: any attempt to load it fails loudly, so an error
    that names a config key proves it came before loading."""
    from lorakit.models import write_demo_model

    path = write_demo_model(tmp_path_factory.mktemp("models") / "demo")
    (path / "model.safetensors").write_bytes(b"not safetensors")
    return path


def _cfg(tmp_path, model, **train):
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({"model": str(model), "output_dir": str(tmp_path / "run"), "data": {"train": str(DATA)},
                                "train": {"max_steps": 1, **train}}))
    return path


@pytest.mark.parametrize("train, key, hint", [
    ({"cpu_offload": True}, "train.cpu_offload", "train.distributed: fsdp2"),
    ({"fsdp_replicate": 2, "distributed": "ddp"}, "train.fsdp_replicate", "train.distributed: fsdp2"),
    ({"fsdp_replicate": 0, "distributed": "fsdp2"}, "train.fsdp_replicate", ">= 1"),
])
def test_sharding_options_without_fsdp2_are_config_errors(tmp_path, broken, train, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(tmp_path, broken, **train))
    assert key in str(err.value) and hint in str(err.value)


def test_an_attention_kernel_that_cannot_run_here_is_refused_before_loading(tmp_path, broken):
    if not torch.cuda.is_available():
        for kernel, words in (("flash_attention_2", "flash-attn"), ("flex_attention", "no backward")):
            cfg = load_config(_cfg(tmp_path, broken, attn_implementation=kernel, device="cpu"))
            with pytest.raises(ValueError) as err:
                run(cfg, log=lambda _: None)
            assert f"train.attn_implementation={kernel}" in str(err.value) and words in str(err.value)
    assert resolve_attention("auto", torch.device("cpu"), torch.float32).implementation == "sdpa"
    assert resolve_attention("eager", torch.device("cpu"), torch.float32).padding_free_capable is False
    assert resolve_attention("sdpa", torch.device("cpu"), torch.float32).padding_free_capable is False


def test_fsdp_replicate_that_does_not_divide_the_ranks_is_refused_before_loading(tmp_path, broken):
    cfg = _cfg(tmp_path, broken, distributed="fsdp2", fsdp_replicate=2)
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", str(cfg)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "train.fsdp_replicate=2 must divide the 1 ranks" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_gradient_scalers_state_goes_into_checkpoints(tmp_path):
    from lorakit import LoraConfig, inject_lora
    from lorakit.training import build_optimizer, load_checkpoint_state, save_checkpoint

    from .models import tiny_qwen3

    model = tiny_qwen3()
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = build_optimizer(model, 1e-3, 0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    loss = model(input_ids=torch.tensor([[1, 2, 3]])).logits.float().sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    for p in model.parameters():  # an overflow: the next update halves the scale
        if p.grad is not None:
            p.grad.fill_(float("inf"))
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 9
    path = save_checkpoint(tmp_path, 2, model, optimizer, {"step": 2}, scaler=scaler)

    fresh = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=3)
    load_checkpoint_state(path, model, optimizer, scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == 2.0 ** 9

    shutil.copytree(path, tmp_path / "no-scaler")
    (tmp_path / "no-scaler" / "scaler.json").unlink()
    with pytest.raises(ValueError, match="scaler.json"):
        load_checkpoint_state(tmp_path / "no-scaler", model, optimizer, scaler=fresh)


def test_the_packed_sample_check_tolerance_fits_bf16():
    """The start-up check that packed samples stay apart compares logits within what the model's
    dtype can resolve: a correct bf16 model passes it."""
    from lorakit.models.attention import isolation_tolerance
    from lorakit.training import packed_attention_is_isolated

    from .models import tiny_qwen3

    assert isolation_tolerance(torch.float32) < isolation_tolerance(torch.float16) < isolation_tolerance(torch.bfloat16)
    assert isolation_tolerance(torch.bfloat16) >= 2 * torch.finfo(torch.bfloat16).eps
    assert packed_attention_is_isolated(tiny_qwen3(vocab=128).to(torch.bfloat16))

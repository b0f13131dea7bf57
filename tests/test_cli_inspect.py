import json
import subprocess
import sys

import pytest

from lorakit import LoraConfig, inject_lora, save_adapter
from lorakit.cli import main

from .models import tiny_qwen3


def _save(tmp_path, **kwargs):
    model = tiny_qwen3()
    inject_lora(model, LoraConfig(**kwargs))
    save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def test_inspect_prints_config_modules_params_and_size(tmp_path, capsys):
    path = _save(tmp_path, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "r=8  alpha=16  scale=2" in out
    assert "wrapped modules: 4  ranks: r=8 x4" in out
    assert "model.layers.1.self_attn.v_proj  r=8" in out
    params = 2 * (8 * 32 + 32 * 8) + 2 * (8 * 32 + 16 * 8)
    assert f"parameters: {params:,}" in out
    assert "file size: " in out and "KiB" in out


def test_check_vllm_ok_and_refusals(tmp_path, capsys):
    ok = _save(tmp_path, r=8, target_modules=["q_proj"])
    assert main(["inspect", str(ok), "--check", "vllm"]) == 0
    assert "vLLM check: OK" in capsys.readouterr().out

    bad = _save(tmp_path / "b", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    data = json.loads((bad / "adapter_config.json").read_text())
    data["use_dora"] = True  # a DoRA adapter: lorakit loads it, vLLM does not serve it unmerged
    (bad / "adapter_config.json").write_text(json.dumps(data))
    assert main(["inspect", str(bad), "--check", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "variant: DoRA" in out
    assert "vLLM check: FAILED" in out
    assert "modules_to_save=['lm_head']" in out and "rank(s) [4]" in out and "DoRA" in out


def test_inspect_bad_path_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "lorakit", "inspect", "/nonexistent"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lorakit inspect: error: /nonexistent: not an adapter directory"
    assert "Traceback" not in proc.stderr

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
    assert "modules_to_save=['lm_head']" in out and "DoRA" in out
    assert "rank" not in out.split("vLLM check: FAILED")[1]  # rank 4 is fine: --max-lora-rank is an upper bound
    big = _save(tmp_path / "c", r=640, target_modules=["q_proj"])
    assert main(["inspect", str(big), "--check", "vllm"]) == 1
    assert "rank 640 exceeds 512, the largest --max-lora-rank vLLM accepts" in capsys.readouterr().out


_VLLM_VALIDATE = """
import sys
from vllm.config.lora import LoRAConfig
from vllm.lora.peft_helper import PEFTHelper
for path, rank in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        PEFTHelper.from_local_dir(path, None).validate_legal(LoRAConfig(max_lora_rank=int(rank)))
        print("accepted")
    except ValueError:
        print("refused")
"""


@pytest.mark.vllm
def test_check_vllm_prints_the_max_lora_rank_vllm_itself_accepts(tmp_path, capsys):
    """Oracle: vLLM's own adapter validation (PEFTHelper.validate_legal)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (CI installs the CPU build and runs the vllm-marked tests)")
    adapters = {r: _save(tmp_path / f"r{r}", r=r, target_modules=["q_proj"]) for r in (4, 12, 16)}
    patterned = _save(tmp_path / "pattern", r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 40})
    flags = {}
    for name, path in [*adapters.items(), ("pattern", patterned)]:
        assert main(["inspect", str(path), "--check", "vllm"]) == 0
        flags[name] = int(re.search(r"--max-lora-rank (\d+) --max-loras 1", capsys.readouterr().out).group(1))
    assert flags == {4: 8, 12: 16, 16: 16, "pattern": 64}
    assert main(["inspect", *map(str, adapters.values()), "--check", "vllm"]) == 0
    assert "--max-lora-rank 16 --max-loras 3" in capsys.readouterr().out
    # vLLM accepts each adapter at the printed value and refuses it at the next smaller allowed one
    smaller = {8: 1, 16: 8, 64: 32}
    args = []
    for name, path in [*adapters.items(), ("pattern", patterned)]:
        args += [str(path), str(flags[name]), str(path), str(smaller[flags[name]])]
    proc = subprocess.run([sys.executable, "-c", _VLLM_VALIDATE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["accepted", "refused"] * 4


def test_inspect_bad_path_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "lorakit", "inspect", "/nonexistent"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lorakit inspect: error: /nonexistent: not an adapter directory"
    assert "Traceback" not in proc.stderr

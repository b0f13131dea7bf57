import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_quick_lora_example_runs_and_writes_a_loadable_adapter(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quick_lora.py"), "--out", str(tmp_path / "ad"),
                           "--steps", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reloaded into a fresh base: max |logit diff| = 0.00e+00" in proc.stdout
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    # Oracle for the saved file: the real peft loads it into the example's base and gets the losses it printed.
    peft = pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("quick_lora", ROOT / "examples" / "quick_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    base_printed, lora_printed = map(float, re.search(r"loss on the pattern: base ([0-9.]+) -> base\+LoRA ([0-9.]+)",
                                                      proc.stdout).groups())
    pattern = torch.arange(10, 42).repeat(4)[None, :]
    with torch.no_grad():
        base_loss = example.build_model().eval()(input_ids=pattern, labels=pattern).loss.item()
        adapted = peft.PeftModel.from_pretrained(example.build_model(), tmp_path / "ad").eval()
        lora_loss = adapted(input_ids=pattern, labels=pattern).loss.item()
    assert base_loss == pytest.approx(base_printed, abs=1e-3)
    assert lora_loss == pytest.approx(lora_printed, abs=1e-3)
    assert lora_loss < base_loss - 0.1  # five steps already learn some of the pattern

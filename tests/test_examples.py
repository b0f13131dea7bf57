import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_lora_example_runs_and_writes_a_loadable_adapter(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quick_lora.py"), "--out", str(tmp_path / "ad"),
                           "--steps", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reloaded into a fresh base: max |logit diff| = 0.00e+00" in proc.stdout
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()

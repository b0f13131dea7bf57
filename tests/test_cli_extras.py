"""A missing optional extra is one line naming `pip install 'lorakit[...]'`, exit 2, before any weight is read.

The CLI runs in a subprocess where the extra's module cannot be imported: a meta-path finder put
first on ``sys.meta_path`` answers ``ModuleNotFoundError`` for it, exactly as Python does for a
package that is not installed. The base model's weights file is garbage, so a run that read any
weight before the check would fail with another error.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.models import write_demo_model

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = sys.argv[1].split(",")

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
for name in [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]:
    del sys.modules[name]
sys.argv = ["lorakit", *sys.argv[2:]]
from lorakit.cli import main
raise SystemExit(main())
"""


@pytest.fixture(scope="module")
def broken_base(tmp_path_factory):
    """The demo model with its weights file replaced by garbage: reading it fails."""
    from safetensors.torch import load_file

    demo = write_demo_model(tmp_path_factory.mktemp("extras") / "demo")
    weights = demo / "model.safetensors"
    assert weights.is_file()
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(Exception):
        load_file(str(weights))
    return demo


def _cli(blocked, *args, cwd):
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(blocked), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _one_line_naming(proc, extra, module):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # no traceback, no second error
    assert f"pip install 'lorakit[{extra}]'" in lines[0] and module in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("blocked, module", [(["uvicorn"], "uvicorn"), (["starlette"], "starlette"),
                                             (["prometheus_client"], "prometheus_client")])
def test_serve_without_the_serve_extra(broken_base, tmp_path, blocked, module):
    proc = _cli(blocked, "serve", "--model", str(broken_base), "--port", "0", cwd=tmp_path)
    line = _one_line_naming(proc, "serve", module)
    assert line.startswith("lorakit serve: error: lorakit serve needs"), line


def test_nf4_training_without_bitsandbytes(broken_base, tmp_path):
    proc = _cli(["bitsandbytes"], "train", str(ROOT / "configs" / "quickstart.yaml"), f"model={broken_base}",
                "quantization=nf4", f"output_dir={tmp_path / 'out'}", f"data.train={ROOT / 'examples/data/identity.jsonl'}",
                cwd=tmp_path)
    line = _one_line_naming(proc, "quant", "bitsandbytes")
    assert "quantization: nf4" in line, line
    assert not (tmp_path / "out").exists()  # nothing started


def test_merge_quantized_without_bitsandbytes(broken_base, tmp_path):
    proc = _cli(["bitsandbytes"], "merge", "--model", str(broken_base), "--adapter", str(tmp_path / "none"),
                "--out", str(tmp_path / "merged"), "--quantization", "nf4", cwd=tmp_path)
    _one_line_naming(proc, "quant", "bitsandbytes")


def test_grpo_with_the_vllm_engine_without_vllm(broken_base, tmp_path):
    proc = _cli(["vllm"], "train", str(ROOT / "configs" / "grpo.yaml"), f"model={broken_base}", "rollout.engine=vllm",
                f"output_dir={tmp_path / 'out'}", f"data.train={ROOT / 'examples/data/arith_rl.jsonl'}",
                f"data.eval={ROOT / 'examples/data/arith_eval.jsonl'}", cwd=tmp_path)
    line = _one_line_naming(proc, "vllm", "vLLM")
    assert "rollout.backend: vllm" in line and "scripts/install_vllm_cpu.sh" in line, line


def test_serve_tinker_without_the_tinker_sdk(broken_base, tmp_path):
    proc = _cli(["tinker"], "serve", "--model", str(broken_base), "--port", "0", "--tinker", cwd=tmp_path)
    line = _one_line_naming(proc, "tinker", "tinker")
    assert line.startswith("lorakit serve: error: lorakit serve --tinker needs"), line

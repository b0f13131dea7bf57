"""The core stays small: torch + safetensors + stdlib only, and traceable by torch.compile."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from lorakit import LoraConfig, inject_lora, route_adapters

CORE = Path(__file__).resolve().parents[2] / "src" / "lorakit" / "lora"
ALLOWED = {"torch", "safetensors"} | set(sys.stdlib_module_names)


def test_core_source_imports_only_torch_safetensors_stdlib():
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= ALLOWED, f"{path.name} imports {roots}"


def test_bitsandbytes_specifics_live_in_lora_quant_only():
    # One home for quantization: lorakit.lora.quant knows bitsandbytes' classes and attributes (and
    # never imports it); every other module, models/quantize.py included, only calls it.
    specific = re.compile(r"\b(Linear4bit|LinearNF4|LinearFP4|Params4bit|Linear8bitLt|Int8Params|quant_state|"
                          r"quant_type|is_loaded_in_[48]bit|support_avx512bf16_for_cpu|bnb\.nn)\b")
    package = CORE.parent
    found = [f"{path.relative_to(package)}:{number}: {line.strip()}" for path in sorted(package.rglob("*.py"))
             if path != CORE / "quant.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if specific.search(line)]
    assert not found, "bitsandbytes specifics outside lorakit/lora/quant.py:\n" + "\n".join(found)


def test_importing_lorakit_pulls_in_no_hf_package():
    code = "import sys, lorakit, lorakit.lora; print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'peft', 'yaml', 'accelerate'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    inject_lora(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), adapter_name="a")
    inject_lora(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), adapter_name="b")
    return model


def test_torch_compile_fullgraph_matches_eager():
    model = _model()
    x = torch.randn(4, 8)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert model[0].lora_B["b"].weight.grad is not None
    with route_adapters(model, ["a", None, "b", "a"]):
        routed_eager = model(x)
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), routed_eager)

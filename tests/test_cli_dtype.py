"""`--dtype` on generate / chat / serve: the weights' dtype the command runs in."""

import os
import subprocess
import sys

import pytest
import torch

from lorakit.cli import build_parser
from lorakit.models import resolve_dtype, write_demo_model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("dtype") / "demo")


def _generate(demo, dtype):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "generate", "--model", str(demo), "--prompt", "Hello there",
                           "--no-chat-template", "--max-new-tokens", "8", "--dtype", dtype],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.rstrip("\n")


def test_generate_in_bf16_equals_transformers_generate_in_bf16(demo):
    """Oracle: transformers' own greedy ``generate`` with the model loaded in bfloat16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo)
    model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.bfloat16).eval()
    ids = tok("Hello there", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert _generate(demo, "bf16") == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_dtype_flag_on_every_generation_command():
    parser = build_parser()
    for command in ("generate", "chat", "serve"):
        extra = ["--prompt", "x"] if command == "generate" else []
        assert parser.parse_args([command, "--model", "m", *extra]).dtype == "auto"
        assert parser.parse_args([command, "--model", "m", *extra, "--dtype", "fp16"]).dtype == "fp16"
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--model", "m", *extra, "--dtype", "int8"])
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32

"""Shared pieces of the benchmarks: median and min-max spread of repeated measurements, and of
per-repeat ratios (each ratio pairs the two sides measured back to back in the same repeat); a
`lorakit serve` subprocess."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional


def spread(values: list[float], fmt: str = ".1f") -> str:
    """``median (min-max, n=N)`` of ``values``."""
    return (f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}}, n={len(values)})")


def ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-repeat ratios ``num[i] / den[i]`` (both sides of repeat i ran back to back)."""
    return [a / b for a, b in zip(num, den)]


def load() -> str:
    """The 1/5/15-minute load averages, printed with every result: the machine may be shared."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def start_serve(model: Path, adapter_dir: Path, env: Optional[dict] = None) -> tuple[subprocess.Popen, str]:
    """A `lorakit serve` of ``model`` on a free port (adapters loadable from ``adapter_dir``); returns
    the process and its /v1 URL. Exits with the server's output when it does not start."""
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(model), "--port", "0",
                             "--adapter-dir", str(adapter_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
    if not found:
        proc.kill()
        raise SystemExit(f"lorakit serve did not start: {line}{proc.stdout.read()}")
    return proc, found.group(0)


# Qwen3-shaped model sizes the benchmarks build from a config (random init, no download). "58m" is
# the CPU benchmarks' model; "qwen3-1.7b" is Qwen3-1.7B's published shape (tied embeddings, 28
# layers, GQA 16/8, head_dim 128), for the GPU lane; "tiny" is for the lane's --dry-run on CPU.
SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False),
    "58m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1000000.0, tie_word_embeddings=True),
}

# H200 (SXM) dense bf16 tensor-core peak, TFLOP/s (NVIDIA's 1,979 is with 2:4 sparsity).
H200_BF16_DENSE_TFLOPS = 989.0


def qwen3_config(shape: str):
    """A transformers ``Qwen3Config`` of one of :data:`SHAPES`."""
    from transformers import Qwen3Config

    if shape not in SHAPES:
        raise SystemExit(f"--shape {shape!r}: choose one of {', '.join(SHAPES)}")
    return Qwen3Config(**SHAPES[shape])


def lora_flops_per_token(config, r: int, target_modules="all-linear") -> dict:
    """Model FLOPs per trained token of LoRA (rank ``r`` on ``target_modules``, default all linear
    layers) on ``config``, counted on a meta-device copy with lorakit's own injection (no memory, no
    compute).

    Counted as ``4 * N_matmul + 6 * N_lora``: the frozen base does a forward (2 FLOPs per weight)
    and a backward for the input gradients only (2 more; no weight gradients), the adapter does all
    three (2 + 2 + 2). ``N_matmul`` is every Linear weight, the LM head included (tied or not: it is
    a matmul either way); the embedding lookup is not a matmul and is left out, and so are the
    attention scores (``4 * seq * d`` per layer, under 5% at these lengths) and the recomputation of
    gradient checkpointing (model FLOPs, not hardware FLOPs). The usual ``6N`` of full fine-tuning
    would overstate LoRA's work by half. ``head_params`` (the output head's weights, part of
    ``N_matmul``) lets a caller count the head only where a loss is taken."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, inject_lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if isinstance(head, torch.nn.Linear) else 0
    inject_lora(model, LoraConfig(r=r, alpha=2 * r, target_modules=target_modules))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"params": total, "matmul_params": matmul, "head_params": head_params, "lora_params": lora,
            "flops_per_token": 4 * matmul + 6 * lora}


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, then rename): a reader never sees half a file."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)

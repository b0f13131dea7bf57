"""One LoRA training step, lorakit vs PEFT, same model, same data, same run.

Model: Qwen3-shaped, built from a config (hidden 512, 8 layers, vocab 32000, ~58M parameters,
random init); LoRA r=16 on every linear layer; batch 4 x 256 tokens; CPU fp32. A step is
forward + backward + AdamW. PEFT is at its defaults for LoRA training (its best correct setting on
CPU: nothing in PEFT 0.21 makes a plain LoRA step faster there). The two sides alternate step by
step, the order flipping each repeat (so drift in machine load hits both), after warm-up; printed:
each side's median and min-max ms/step over --repeats steps, and the ratio of the two steps of each
repeat (median and min-max).

    python benchmarks/core_overhead.py [--repeats 3] [--warmup 2] [--seq 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import load, ratios, spread  # noqa: E402


def build(seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    return Qwen3ForCausalLM(config)


def make_lorakit(r: int):
    from lorakit import LoraConfig, inject_lora

    model = build(0)
    inject_lora(model, LoraConfig(r=r, alpha=2 * r, target_modules="all-linear"))
    return model


def make_peft(r: int):
    import peft

    model = build(0)
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="measured steps per side (at least 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()

    sides = {"lorakit": make_lorakit(args.r), "peft": make_peft(args.r)}
    n_params = sum(p.numel() for p in sides["lorakit"].parameters() if not p.requires_grad)
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in sides.items()}
    assert trainable["lorakit"] == trainable["peft"], trainable
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in sides.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (args.batch, args.seq), generator=g)

    def step(name: str) -> float:
        model, opt = sides[name], opts[name]
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    print(f"model: {n_params / 1e6:.1f}M base params, LoRA r={args.r} all-linear ({trainable['lorakit']:,} trainable), "
          f"batch {args.batch}x{args.seq}, torch {torch.__version__}, {torch.get_num_threads()} threads; start: {load()}")
    times: dict[str, list[float]] = {"lorakit": [], "peft": []}
    for i in range(args.warmup + args.repeats):
        order = ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit")
        for name in order:
            took = step(name)
            if i >= args.warmup:
                times[name].append(took)
    for name, values in times.items():
        print(f"{name:8s} ms/step {spread([v * 1000 for v in values])}")
    print(f"ratio lorakit/peft ms/step {spread(ratios(times['lorakit'], times['peft']), '.3f')}")
    print(f"end: {load()}")

if __name__ == "__main__":
    main()

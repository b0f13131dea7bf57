"""LoRA variants side by side: train step time and memory of LoRA, DoRA, QLoRA, lorakit vs PEFT.

One process, one model shape, one batch. Sides:

    lora-fp32        lorakit LoRA, fp32 base
    lora-bf16        lorakit LoRA, bf16 base, fp32 adapter, bf16 autocast
    dora             lorakit DoRA, fp32 base (bf16 base on a GPU)
    dora-peft        PEFT DoRA, same base
    qlora-nf4        lorakit QLoRA: bitsandbytes NF4 base (double quantisation), fp32 adapter
    qlora-nf4-peft   PEFT on the same NF4 base

A step is forward + backward + AdamW on LoRA r=16 over every linear layer. The sides run
round-robin, one step each, after warm-up, so drifting machine load hits all of them alike;
``--repeats`` rounds of ``--steps`` steps each give a median per round, and the table shows the
median over rounds with its min..max spread and the ratios the targets are stated in.
Memory: the base's weight bytes (quantized codes + statistics for NF4), and on CUDA the peak
memory a step allocates above what the models hold.

    python benchmarks/variants.py [--hidden 512] [--layers 4] [--batch 2] [--seq 128] [--repeats 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from contextlib import nullcontext

import torch


def build(args, dtype=torch.float32):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=args.hidden // 8, max_position_embeddings=1024, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).to(dtype)


def make(side: str, args, device):
    from lorakit import LoraConfig, inject_lora
    from lorakit.models.quantize import base_memory_bytes, quantize_model

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if side == "lora-bf16" or (gpu and side.startswith("dora")) else torch.float32
    model = build(args, dtype)
    if side.startswith("qlora"):
        quantize_model(model, "nf4", compute_dtype=torch.bfloat16 if gpu else torch.float32, device=device)
    model.to(device)
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    linear_bytes = sum(base_memory_bytes(m) for m in linear)  # codes + quantisation statistics for NF4
    linear_params = sum(m.in_features * m.out_features for m in linear)
    cfg = dict(r=args.r, target_modules="all-linear", use_dora=side.startswith("dora"))
    if side.endswith("-peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(lora_alpha=2 * args.r, **cfg))
        for p in model.parameters():  # PEFT's default casts adapters to fp32 already; make sure
            if p.requires_grad:
                p.data = p.data.float()
    else:
        inject_lora(model, LoraConfig(alpha=2 * args.r, **cfg))
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 or (gpu and side.startswith("qlora")) else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    return {"model": model, "opt": torch.optim.AdamW(params, lr=1e-4), "autocast": autocast, "linear_bytes": linear_bytes,
            "linear_params": linear_params, "times": [], "peaks": []}


def step(side, ids, device):
    model, opt = side["model"], side["opt"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with side["autocast"]:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        side["peaks"].append(torch.cuda.max_memory_allocated() - held)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each gives a median step time per side")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per side per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sides", default="lora-fp32,lora-bf16,dora,dora-peft,qlora-nf4,qlora-nf4-peft")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = args.sides.split(",")
    sides = {name: make(name, args, device) for name in names}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(args.warmup):
        for side in sides.values():
            step(side, ids, device)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.steps):
            for name, side in sides.items():
                times[name].append(step(side, ids, device))
        for name in names:
            rounds[name].append(statistics.median(times[name]))

    median = {n: statistics.median(v) for n, v in rounds.items()}
    base_ref = sides.get("lora-bf16", next(iter(sides.values())))
    bf16_bytes = base_ref["linear_params"] * 2
    print(f"# lorakit variants benchmark, {datetime.date.today().isoformat()}, torch {torch.__version__}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"))
    print(f"# Qwen3 shape hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; LoRA r={args.r} all-linear; "
          f"batch {args.batch} x {args.seq} tokens; {args.repeats} rounds x {args.steps} steps (round-robin)")
    print()
    print("| side | step ms (median, min..max of rounds) | vs lora-fp32 | linear weights MiB | vs bf16 linear | step peak MiB |")
    print("|---|---|---|---|---|---|")
    lora = median.get("lora-fp32")
    for name in names:
        side = sides[name]
        linear_bytes = side["linear_bytes"]
        peak = f"{statistics.median(side['peaks']) / 2**20:.1f}" if side["peaks"] else "n/a (CPU)"
        ratio = f"{median[name] / lora:.2f}x" if lora else "-"
        print(f"| {name} | {1e3 * median[name]:.1f} ({1e3 * min(rounds[name]):.1f}..{1e3 * max(rounds[name]):.1f}) | "
              f"{ratio} | {linear_bytes / 2**20:.2f} | {linear_bytes / bf16_bytes:.2f}x | {peak} |")
    print()
    for ours, theirs in (("dora", "dora-peft"), ("qlora-nf4", "qlora-nf4-peft")):
        if ours in median and theirs in median:
            print(f"{ours} / {theirs} step time: {median[ours] / median[theirs]:.2f}x "
                  f"(per round: {', '.join(f'{a / b:.2f}' for a, b in zip(rounds[ours], rounds[theirs]))})")
    if "dora" in median and lora:
        print(f"dora / lora-fp32 step time: {median['dora'] / lora:.2f}x (target <= 1.25x)")


if __name__ == "__main__":
    main()

"""lorakit in one screen: build a tiny Qwen3, add LoRA, train a few steps, save, reload, merge.

Runs on a laptop CPU in seconds, with no network: the model is built from a config (random init)
and the "data" is a fixed token pattern the adapter learns to continue.

    python examples/quick_lora.py [--out out/quick_lora] [--steps 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lorakit import (
    LoraConfig,
    disable_adapters,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_report,
    unload_lora,
)


def build_model(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return Qwen3ForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/quick_lora", help="where the adapter is written")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    args = parser.parse_args()
    out = Path(args.out)

    model = build_model()
    pattern = torch.arange(10, 42).repeat(4)[None, :]  # 10 11 ... 41 10 11 ...: learnable by LoRA
    batch = pattern.repeat(4, 1)

    wrapped = inject_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    print(f"[1] injected LoRA into {len(wrapped)} modules, e.g. {wrapped[0]}")
    print(trainable_report(model))

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"[2] step {step:3d}  loss {loss.item():.4f}")
    print(f"    trained {args.steps} steps in {time.perf_counter() - start:.1f}s")
    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=pattern).logits
        with disable_adapters(model):
            base_loss = model(input_ids=pattern, labels=pattern).loss.item()
        lora_loss = model(input_ids=pattern, labels=pattern).loss.item()
    print(f"    loss on the pattern: base {base_loss:.3f} -> base+LoRA {lora_loss:.3f}")

    save_adapter(model, out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"[3] saved PEFT adapter to {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))}; {size / 1024:.0f} KiB)")

    fresh = build_model()
    load_adapter(fresh, out)
    with torch.no_grad():
        diff = (fresh(input_ids=pattern).logits - trained_logits).abs().max().item()
    print(f"[4] reloaded into a fresh base: max |logit diff| = {diff:.2e}")

    merge_lora(fresh)
    with torch.no_grad():
        merged_diff = (fresh(input_ids=pattern).logits - trained_logits).abs().max().item()
    plain = unload_lora(fresh, merge=True)
    n_lora = sum(1 for n, _ in plain.named_parameters() if "lora_" in n)
    print(f"[5] merged: max |logit diff| = {merged_diff:.2e}; unloaded: {n_lora} LoRA parameters left")
    if diff > 1e-5 or merged_diff > 1e-4 or not lora_loss < base_loss:
        raise SystemExit("quick_lora: results do not match; this is a bug, please report it")
    print("done: the adapter learned the pattern, round-tripped through disk, and merged exactly.")


if __name__ == "__main__":
    main()

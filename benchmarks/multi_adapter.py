"""Generation throughput with many adapters: 1 adapter vs 8 different adapters mixed in one batch,
vs the merged model; same batch size, same prompt and output lengths, one process.

Model: Qwen3-shaped, ~58M parameters (hidden 512, 8 layers, vocab 32000), random init; adapters:
r=16 on all linear layers, random weights. Batch 8, prompts of 64 tokens, 64 new tokens each
(greedy, end-of-sequence ignored so every run decodes the same number of tokens). The three modes
alternate within each repeat (after one warm-up round); printed: each mode's median and min-max
tokens/s, and the ratios of modes measured in the same repeat (median and min-max).

    python benchmarks/multi_adapter.py [--batch 8] [--prompt-len 64] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import load, ratios, spread  # noqa: E402


def build(n_adapters: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lorakit import LoraConfig, inject_lora
    from lorakit.models import build_demo_tokenizer

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).eval()
    for i in range(n_adapters):
        inject_lora(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"), adapter_name=f"a{i}", trainable=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f".a{i}." in name or name.endswith(f".a{i}"):
                    p.normal_(0, 0.02)
    return model, build_demo_tokenizer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from lorakit import merge_lora, set_active_adapters, unload_lora
    from lorakit.generation import Engine, Request, SamplingParams

    model, tokenizer = build(8)
    merged = copy.deepcopy(model)
    set_active_adapters(merged, ["a0"])
    merge_lora(merged)
    merged = unload_lora(merged, merge=True)
    engines = {"lorakit": Engine(model, tokenizer), "merged": Engine(merged, tokenizer)}
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    modes = {
        "1 adapter": ("lorakit", ["a0"] * args.batch),
        "8 adapters mixed": ("lorakit", [f"a{i % 8}" for i in range(args.batch)]),
        "merged (no LoRA)": ("merged", [None] * args.batch),
    }
    print(f"start: {load()}")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for repeat in range(args.repeats + 1):
        for mode, (engine, names) in modes.items():
            start = time.perf_counter()
            out = engines[engine].generate([Request(p, n, params) for p, n in zip(prompts, names)])
            took = time.perf_counter() - start
            assert all(len(c.token_ids) == args.new for c in out)
            if repeat > 0:  # the first round warms up
                times[mode].append(took)
    tokens = args.batch * args.new
    print(f"model ~58M Qwen3-shaped, 8 adapters r=16 all-linear, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new} new tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    tps = {mode: [tokens / t for t in values] for mode, values in times.items()}
    for mode, values in tps.items():
        print(f"{mode:18s} tokens/s {spread(values)}")
    print(f"ratio 8-mixed / 1-adapter {spread(ratios(tps['8 adapters mixed'], tps['1 adapter']), '.3f')}")
    print(f"ratio 1-adapter / merged  {spread(ratios(tps['1 adapter'], tps['merged (no LoRA)']), '.3f')}")
    print(f"end: {load()}")

if __name__ == "__main__":
    main()

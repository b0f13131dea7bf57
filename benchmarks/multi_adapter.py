"""Generation throughput with many adapters: 1 adapter vs 8 different adapters mixed in one batch,
vs the merged model; same batch size, same prompt and output lengths, one process.

Model: Qwen3-shaped, ~58M parameters (hidden 512, 8 layers, vocab 32000), random init; adapters:
r=16 on all linear layers, random weights. Batch 8, prompts of 64 tokens, 64 new tokens each
(greedy, end-of-sequence ignored so every run decodes the same number of tokens). The three modes
alternate within each repeat (after one warm-up round); printed: each mode's median and min-max
tokens/s, and the ratios of modes measured in the same repeat (median and min-max).

    python benchmarks/multi_adapter.py [--batch 8] [--prompt-len 64] [--new 64] [--repeats 3]

On a GPU (the lane, scripts/gpu_lane.sh): ``--device cuda --dtype bf16 --shape qwen3-1.7b --batch
1,16,64 --json out.json``: the model is built on the device in bf16 (adapters too), each batch size
is measured in turn, and the JSON is rewritten after each one (a stage cut short keeps what it has).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import load, qwen3_config, ratios, spread, write_json  # noqa: E402


def build(n_adapters: int, shape: str = "58m", device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import Qwen3ForCausalLM

    from lorakit import LoraConfig, inject_lora
    from lorakit.models import build_demo_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(qwen3_config(shape)).eval().to(dtype)
    for i in range(n_adapters):
        inject_lora(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"), adapter_name=f"a{i}", trainable=False,
                    dtype=dtype)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f".a{i}." in name or name.endswith(f".a{i}"):
                    p.normal_(0, 0.02)
    return model, build_demo_tokenizer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="8", help="rows per run; a comma list measures each in turn")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--shape", default="58m", help="model shape (benchmarks/_report.py SHAPES)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file (after each batch size)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]

    from lorakit import merge_lora, set_active_adapters, unload_lora
    from lorakit.generation import Engine, Request, SamplingParams

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tokenizer = build(8, args.shape, args.device, dtype)
    merged = copy.deepcopy(model)
    set_active_adapters(merged, ["a0"])
    merge_lora(merged)
    merged = unload_lora(merged, merge=True)
    engines = {"lorakit": Engine(model, tokenizer), "merged": Engine(merged, tokenizer)}
    threads = f"{torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"model {args.shape} Qwen3-shaped {args.dtype} on {args.device}, 8 adapters r=16 all-linear, prompt "
          f"{args.prompt_len}, {args.new} new tokens, torch {torch.__version__}, {threads}")
    report = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "shape": args.shape, "dtype": args.dtype,
              "prompt_len": args.prompt_len, "new": args.new, "repeats": args.repeats, "results": []}
    for batch in batches:
        report["results"].append(measure(engines, batch, args, Request, SamplingParams))
        if args.json:
            write_json(args.json, report)


def measure(engines: dict, batch: int, args: argparse.Namespace, Request, SamplingParams) -> dict:
    """Tokens/s of the three modes at ``batch`` rows (after one warm-up round); prints and returns them."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (args.prompt_len,), generator=gen).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    modes = {
        "1 adapter": ("lorakit", ["a0"] * batch),
        "8 adapters mixed": ("lorakit", [f"a{i % 8}" for i in range(batch)]),
        "merged (no LoRA)": ("merged", [None] * batch),
    }
    print(f"[batch {batch}] start: {load()}")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for repeat in range(args.repeats + 1):
        for mode, (engine, names) in modes.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = engines[engine].generate([Request(p, n, params) for p, n in zip(prompts, names)])
            took = time.perf_counter() - start  # generate returns token ids on the host: synchronised
            assert all(len(c.token_ids) == args.new for c in out)
            if repeat > 0:  # the first round warms up
                times[mode].append(took)
    tokens = batch * args.new
    tps = {mode: [tokens / t for t in values] for mode, values in times.items()}
    for mode, values in tps.items():
        print(f"[batch {batch}] {mode:18s} tokens/s {spread(values)}")
    mixed, single = ratios(tps["8 adapters mixed"], tps["1 adapter"]), ratios(tps["1 adapter"], tps["merged (no LoRA)"])
    print(f"[batch {batch}] ratio 8-mixed / 1-adapter {spread(mixed, '.3f')}")
    print(f"[batch {batch}] ratio 1-adapter / merged  {spread(single, '.3f')}")
    print(f"[batch {batch}] end: {load()}")
    return {"batch": batch, "tokens_per_s": tps,
            "tokens_per_s_median": {mode: statistics.median(values) for mode, values in tps.items()},
            "ratio_mixed_over_single": mixed, "ratio_single_over_merged": single}


if __name__ == "__main__":
    main()

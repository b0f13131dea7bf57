"""Decode throughput of the generation engine at many rows with long histories: this tree's KV cache
vs a baseline lorakit (default: git ref ``main``), same model, same prompts, one run.

Model: Qwen3-shaped, random init (hidden 128, 4 layers, 4 query / 2 KV heads of 64, vocab 32000,
fp32; small, so that the cache, not the weights, dominates a decode step); no adapter. Each row: a
prompt of --prompt-len tokens, then --new tokens (greedy, end of sequence ignored). Measured:
tokens/s over the decode steps only (every row prefilled and running), so the histories run from
--prompt-len to --prompt-len + --new. Each measurement is its own subprocess (PYTHONPATH = that
tree's src); the two trees alternate within each repeat; printed: tokens/s median and min-max per
tree and rows, and the per-repeat ratio this/baseline.

    python benchmarks/engine_cache.py [--rows 64,256] [--prompt-len 512] [--new 32] [--repeats 3]
                                      [--baseline-ref main | --baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import load, ratios, spread  # noqa: E402

HERE = Path(__file__).resolve().parents[1]


def worker(rows: int, prompt_len: int, new: int) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lorakit.generation import Engine, Request, SamplingParams
    from lorakit.models import build_demo_tokenizer

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=prompt_len + new + 16, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    engine = Engine(model, build_demo_tokenizer(), max_num_seqs=rows, prefill_chunk=8192)
    for _ in range(rows):
        prompt = torch.randint(300, 32000, (prompt_len,), generator=gen).tolist()
        engine.add_request(Request(prompt, None, SamplingParams(new, ignore_eos=True)))
    tokens, seconds = 0, 0.0
    while engine.has_unfinished():
        decode_only = not engine._waiting and not engine._prefilling and len(engine._running) == rows
        start = time.perf_counter()
        deltas = engine.step()
        if decode_only:
            seconds += time.perf_counter() - start
            tokens += sum(1 for d in deltas if d.token_id is not None or d.finish_reason)
    return {"tokens": tokens, "seconds": seconds}


def measure(src: Path, rows: int, args: argparse.Namespace) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, __file__, "--worker", "--rows", str(rows), "--prompt-len",
                          str(args.prompt_len), "--new", str(args.new)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"worker on {src} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["tokens"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="64,256")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-ref", default="main", help="git ref whose src/ is the baseline")
    parser.add_argument("--baseline-src", help="a lorakit src/ directory to compare with (instead of --baseline-ref)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.rows), args.prompt_len, args.new)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline_src:
            base = Path(args.baseline_src)
        else:
            archive = subprocess.run(["git", "-C", str(HERE), "archive", args.baseline_ref, "src/lorakit"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            base = Path(tmp) / "src"
        trees = {"baseline": base, "this": HERE / "src"}
        results: dict[tuple[str, int], list[float]] = {}
        row_counts = [int(r) for r in args.rows.split(",")]
        for _ in range(args.repeats):
            for rows in row_counts:
                for name, src in trees.items():
                    results.setdefault((name, rows), []).append(measure(src, rows, args))
                    print(f"  ({name}, {rows} rows: {results[(name, rows)][-1]:.1f} tokens/s)", flush=True)
        print(f"engine decode tokens/s, prompt {args.prompt_len} + {args.new} new tokens per row "
              f"(baseline: {args.baseline_src or args.baseline_ref}); {load()}")
        for rows in row_counts:
            base_tps, this_tps = results[("baseline", rows)], results[("this", rows)]
            print(f"  {rows:4d} rows: baseline {spread(base_tps)}  this {spread(this_tps)}  "
                  f"ratio this/baseline {spread(ratios(this_tps, base_tps), '.2f')}")


if __name__ == "__main__":
    main()

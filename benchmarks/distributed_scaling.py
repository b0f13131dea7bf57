"""Distributed SFT: tokens/s for 1 vs 2 ranks, and peak memory per rank for FSDP2 vs DDP, same model
and data, one run.

Each configuration is a real `lorakit train` launch (torchrun for 2 ranks) on the same ~58M
Qwen3-shaped model (random init) and generated chat data; the per-rank batch is fixed, so 2 ranks
process twice the tokens per step. On CPU both ranks share the machine's cores (OMP threads split
between them), so CPU "scaling" mostly measures overhead; on a GPU machine each rank gets a device.

    python benchmarks/distributed_scaling.py [--steps 6] [--samples 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="per-rank batch")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from sft_throughput import prepare

    import torch

    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.samples)
        runs = [("1 rank", 1, "none"), ("2 ranks DDP", 2, "ddp"), ("2 ranks FSDP2", 2, "fsdp2")]
        results = {}
        for label, nproc, mode in runs:
            out = work / f"out-{nproc}-{mode}"
            overrides = [f"model={work / 'model'}", f"data.train={work / 'data.jsonl'}", f"output_dir={out}",
                         "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", f"train.max_steps={args.steps}",
                         f"train.batch_size={args.batch}", "train.max_seq_len=512", f"train.distributed={mode}"]
            script = ("import resource, runpy, sys; sys.argv = ['lorakit'] + sys.argv[1:]\n"
                      "try:\n    runpy.run_module('lorakit', run_name='__main__')\n"
                      "finally:\n    print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)\n")
            launcher = [sys.executable, "-c", script] if nproc == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "--no-python", sys.executable, "-c", script]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
            # /dev/null is an empty YAML config: everything comes from the overrides
            proc = subprocess.run([*launcher, "train", "/dev/null", *overrides], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            summary = next(json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "train_runtime" in l)
            peaks = [float(x) for x in re.findall(r"PEAK_RSS_MB ([0-9.]+)", proc.stdout + proc.stderr)]
            results[label] = (summary["train_tokens"] / summary["train_runtime"], max(peaks) if peaks else float("nan"))
        print(f"model ~58M Qwen3-shaped, per-rank batch {args.batch}, {args.steps} steps, LoRA r=16 all-linear, "
              f"{cores} CPU cores, torch {torch.__version__}")
        for label, (tps, rss) in results.items():
            print(f"{label:14s} {tps:8.0f} tokens/s   peak RSS per rank {rss:6.0f} MB")
        one = results["1 rank"][0]
        print(f"ratio 2-rank DDP / 1-rank tokens/s = {results['2 ranks DDP'][0] / one:.2f}")
        print(f"ratio 2-rank FSDP2 / 1-rank tokens/s = {results['2 ranks FSDP2'][0] / one:.2f}")
        print(f"ratio FSDP2 / DDP peak RSS per rank = {results['2 ranks FSDP2'][1] / results['2 ranks DDP'][1]:.2f}")


if __name__ == "__main__":
    main()

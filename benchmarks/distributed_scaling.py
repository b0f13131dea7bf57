"""Distributed SFT: tokens/s for 1 vs 2 ranks, and peak memory per rank for FSDP2 vs DDP, same model
and data, one run.

Each configuration is a real `lorakit train` launch (torchrun for 2 ranks) on the same ~58M
Qwen3-shaped model (random init) and generated chat data; the per-rank batch is fixed, so 2 ranks
process twice the tokens per step. On CPU both ranks share the machine's cores (OMP threads split
between them), so CPU "scaling" mostly measures overhead; on a GPU machine each rank gets a device.
The three configurations alternate within each of --repeats rounds; printed: each one's median and
min-max tokens/s and peak RSS per rank, and the ratios of configurations run in the same round.

    python benchmarks/distributed_scaling.py [--steps 6] [--samples 64] [--repeats 3]
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
sys.path.insert(0, str(HERE))
from _report import load, ratios, spread  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="per-rank batch")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of the three configurations")
    args = parser.parse_args()
    from sft_throughput import prepare

    import torch

    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.samples)
        runs = [("1 rank", 1, "none"), ("2 ranks DDP", 2, "ddp"), ("2 ranks FSDP2", 2, "fsdp2")]
        results: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in runs}
        print(f"start: {load()}")
        for repeat in range(args.repeats):
            for label, nproc, mode in runs:
                out = work / f"out-{nproc}-{mode}-{repeat}"
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
                summary = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train_runtime" in x)
                peaks = [float(x) for x in re.findall(r"PEAK_RSS_MB ([0-9.]+)", proc.stdout + proc.stderr)]
                results[label].append((summary["train_tokens"] / summary["train_runtime"], max(peaks) if peaks else float("nan")))
        print(f"model ~58M Qwen3-shaped, per-rank batch {args.batch}, {args.steps} steps, LoRA r=16 all-linear, "
              f"{cores} CPU cores, torch {torch.__version__}")
        tps = {label: [r[0] for r in rs] for label, rs in results.items()}
        rss = {label: [r[1] for r in rs] for label, rs in results.items()}
        for label in results:
            print(f"{label:14s} tokens/s {spread(tps[label], '.0f')}   peak RSS per rank MB {spread(rss[label], '.0f')}")
        one = tps["1 rank"]
        print(f"ratio 2-rank DDP / 1-rank tokens/s {spread(ratios(tps['2 ranks DDP'], one), '.2f')}")
        print(f"ratio 2-rank FSDP2 / 1-rank tokens/s {spread(ratios(tps['2 ranks FSDP2'], one), '.2f')}")
        print(f"ratio FSDP2 / DDP peak RSS per rank {spread(ratios(rss['2 ranks FSDP2'], rss['2 ranks DDP']), '.2f')}")
        print(f"end: {load()}")

if __name__ == "__main__":
    main()

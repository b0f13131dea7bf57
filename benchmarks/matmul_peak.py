"""This machine's measured matmul peak, the yardstick for achieved FLOP/s (issue 30).

  python benchmarks/matmul_peak.py [--size 1024] [--threads N] [--repeats 5] [--dtypes fp32,bf16]

Times square (size x size) @ (size x size) matmuls (2 * size**3 FLOPs each) with torch on the CPU
(or --device cuda), after a warm-up, and prints GFLOP/s per dtype: median and spread over the
repeats, and the bf16 / fp32 ratio. On a CPU with AVX512-BF16 or AMX, bf16 is several times fp32;
on one without (AVX2 only), PyTorch's bf16 matmul is a slow fallback, many times below fp32.
Figures from a loaded, shared machine are a lower bound on the idle peak: say which it was.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gflops(size: int, dtype: torch.dtype, device: str, seconds: float = 1.0) -> float:
    """GFLOP/s of one timed window of back-to-back matmuls (at least 3 of them)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up: kernel selection, caches
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * count / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"size": args.size, "threads": torch.get_num_threads(), "device": args.device}
    for name in args.dtypes.split(","):
        runs = [gflops(args.size, DTYPES[name], args.device) for _ in range(args.repeats)]
        result[name] = {"median_gflops": round(statistics.median(runs), 1), "min": round(min(runs), 1),
                        "max": round(max(runs), 1)}
    if "fp32" in result and "bf16" in result:
        result["bf16_over_fp32"] = round(result["bf16"]["median_gflops"] / result["fp32"]["median_gflops"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

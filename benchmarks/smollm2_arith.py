"""RL on the real model, measured: SmolLM2-135M-Instruct on two-digit addition and subtraction asked
as a person asks ("What is 47 + 38?"), SFT warm start then GRPO with the numeric_match reward.

  # the whole demo: SFT warm start, then GRPO; held-out greedy accuracy of the base, the warm start
  # (GRPO's step 0), during GRPO and at its end, with wall times
  python benchmarks/smollm2_arith.py demo [grpo key=value ...]
  # held-out greedy accuracy of the base and of adapters (--max-new-tokens N, default 56: the longest
  # worked answer the SFT data teaches is 48 tokens)
  python benchmarks/smollm2_arith.py score [ADAPTER ...] [--max-new-tokens N]

Held-out: examples/data/smollm2_arith_eval.jsonl (100 problems no training file holds). A reply is
right when its last number equals the answer (lorakit.rl.rewards.numeric_match, the training
reward). Figures come from a loaded, shared 2-core machine: wall times are noisy, greedy scores are not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_identity import generate  # noqa: E402  (one model load, one batched generate for all adapters)

ROOT = Path(__file__).resolve().parents[1]
SFT_CONFIG = ROOT / "configs" / "smollm2_arith_sft.yaml"
GRPO_CONFIG = ROOT / "configs" / "smollm2_arith_grpo.yaml"
EVAL = ROOT / "examples" / "data" / "smollm2_arith_eval.jsonl"


def score(adapters: Sequence[str], max_new_tokens: int = 56, show: int = 3) -> list[dict]:
    """Held-out greedy accuracy of the base and of each adapter."""
    from lorakit.rl.rewards import numeric_match

    records = [json.loads(line) for line in EVAL.read_text().splitlines() if line.strip()]
    runs = generate([None, *adapters], [r["prompt"] for r in records], max_new_tokens)
    results = []
    for path, completions in zip([None, *adapters], runs):
        right = [numeric_match(r["prompt"], c.text, answer=r["answer"]) for r, c in zip(records, completions)]
        for r, c in list(zip(records, completions))[:show]:
            print(f"  [{path or 'base'}] {r['prompt']!r} -> {c.text.strip()[:80]!r} (answer {r['answer']})")
        results.append({"adapter": path, "accuracy": sum(right) / len(right), "of": len(right),
                        "max_new_tokens": max_new_tokens})
    return results


def demo(overrides: list[str]) -> None:
    times = {}
    for name, config, extra in (("sft", SFT_CONFIG, []), ("grpo", GRPO_CONFIG, overrides)):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lorakit", "train", str(config), *extra], check=True, cwd=ROOT)
        times[name] = round(time.perf_counter() - start)
    out = ROOT / next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), "out/smollm2_arith_grpo")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(m["step"], m[key]) for m in metrics for key in m if key.startswith("eval_")]
    base = score([], show=0)[0]["accuracy"]
    print(json.dumps({"overrides": overrides, "wall_s": times, "base_accuracy": base, "held_out_curve": curve}))


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["score"]
    if command == "demo":
        demo(rest)
    else:
        tokens = 56
        if "--max-new-tokens" in rest:
            i = rest.index("--max-new-tokens")
            tokens = int(rest[i + 1])
            rest = rest[:i] + rest[i + 2:]
        for r in score(rest, tokens):
            print(json.dumps(r))

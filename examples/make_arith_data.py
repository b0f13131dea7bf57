"""Write the arithmetic demo's data (deterministic): SFT warm-start chats, GRPO prompts, held-out prompts.

    python examples/make_arith_data.py    # rewrites examples/data/arith_*.jsonl

Problems are ``a + b`` with 0 <= a < 997 and 1 <= b <= 3, written with fixed widths ("047+3=")
and answered with three digits ("050"): the demo model is a random-init transformer, and a digit
table this small, at fixed positions, is what its LoRA can learn in minutes on a CPU. The three
files use disjoint (a, b) pairs, so the held-out accuracy measures generalisation, not recall.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SFT, RL, EVAL = 1500, 600, 200
DATA = Path(__file__).parent / "data"


def question(a: int, b: int) -> str:
    return f"{a:03d}+{b}="


def main() -> None:
    pairs = [(a, b) for a in range(997) for b in range(1, 4)]
    random.Random(0).shuffle(pairs)
    sft, rl, held = pairs[:SFT], pairs[SFT:SFT + RL], pairs[SFT + RL:SFT + RL + EVAL]
    DATA.mkdir(exist_ok=True)
    with open(DATA / "arith_sft.jsonl", "w") as f:
        for a, b in sft:
            f.write(json.dumps({"messages": [{"role": "user", "content": question(a, b)},
                                             {"role": "assistant", "content": f"{a + b:03d}"}]}) + "\n")
    for name, chunk in (("arith_rl.jsonl", rl), ("arith_eval.jsonl", held)):
        with open(DATA / name, "w") as f:
            for a, b in chunk:
                f.write(json.dumps({"prompt": question(a, b), "answer": f"{a + b:03d}"}) + "\n")


if __name__ == "__main__":
    main()

"""Write the real-model arithmetic demo's data (deterministic): questions a person asks SmolLM2.

    python examples/make_smollm2_arith_data.py [OUT_DIR]   # rewrites examples/data/smollm2_arith_*.jsonl

Two-digit addition and subtraction ("What is 47 + 38?", "How much is 90 minus 27?"), in a dozen
phrasings; subtraction keeps a >= b, so every answer is a whole number from 0 to 198. The three
files hold disjoint problems (operands and operator), so held-out accuracy measures the skill, not
recall. The SFT warm start's answers are one short sentence ending in the number ("47 + 38 = 85."):
the format that lets greedy decoding stop early and ``numeric_match`` read the last number.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SFT, RL, EVAL = 200, 1000, 100
DATA = Path(__file__).parent / "data"
PHRASINGS = {
    "+": ["What is {a} + {b}?", "What's {a} plus {b}?", "How much is {a} + {b}?", "Can you add {a} and {b}?",
          "What do you get if you add {a} and {b}?", "Calculate {a} + {b}.", "What is the sum of {a} and {b}?",
          "Quick question: {a} + {b} = ?"],
    "-": ["What is {a} - {b}?", "What's {a} minus {b}?", "How much is {a} - {b}?", "Can you subtract {b} from {a}?",
          "What do you get if you take {b} away from {a}?", "Calculate {a} - {b}.",
          "What is the difference between {a} and {b}?", "Quick question: {a} - {b} = ?"],
}


def worked(a: int, b: int, op: str) -> str:
    """The answer written out digit by digit, ones first, the way it is done on paper: a small model
    that writes the carry (or borrow) down before the tens digit gets far more right than one that
    must produce the tens digit first ("47 + 38: 7 + 8 = 15, carry 1. 4 + 3 + 1 = 8. So 47 + 38 = 85.")."""
    (x, y), (u, v) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        ones = y + v
        carry = ones // 10
        steps = f"{y} + {v} = {ones}" + (", carry 1." if carry else ".")
        steps += f" {x} + {u}" + (" + 1" if carry else "") + f" = {x + u + carry}."
        answer = a + b
    else:
        borrow = int(y < v)
        steps = (f"{10 + y} - {v} = {10 + y - v}, borrow 1." if borrow else f"{y} - {v} = {y - v}.")
        steps += f" {x} - {u}" + (" - 1" if borrow else "") + f" = {x - u - borrow}."
        answer = a - b
    return f"{a} {op} {b}: {steps} So {a} {op} {b} = {answer}."


def main(out: Path = DATA) -> None:
    rng = random.Random(0)
    problems = [(a, b, op) for a in range(10, 100) for b in range(10, 100) for op in "+-" if op == "+" or a >= b]
    rng.shuffle(problems)
    held, rl, sft = problems[:EVAL], problems[EVAL:EVAL + RL], problems[EVAL + RL:EVAL + RL + SFT]

    def record(a: int, b: int, op: str) -> tuple[str, int]:
        return rng.choice(PHRASINGS[op]).format(a=a, b=b), a + b if op == "+" else a - b

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "smollm2_arith_sft.jsonl", "w") as f:
        for a, b, op in sft:
            question, answer = record(a, b, op)
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": worked(a, b, op)}]}) + "\n")
    for name, chunk in (("smollm2_arith_rl.jsonl", rl), ("smollm2_arith_eval.jsonl", held)):
        with open(out / name, "w") as f:
            for a, b, op in chunk:
                question, answer = record(a, b, op)
                f.write(json.dumps({"prompt": question, "answer": str(answer)}) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA)

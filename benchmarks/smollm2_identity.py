"""The real-model quick start, measured: does an adapter teach SmolLM2-135M-Instruct to answer as Kit
without making it forget what it knew?

  # once: the base model's own answers to general prompts (the "keep" data shipped with the config)
  python benchmarks/smollm2_identity.py make-keep-data
  # train with configs/smollm2_quickstart.yaml (plus any key=value overrides) and score it
  python benchmarks/smollm2_identity.py train [key=value ...]
  # score an adapter (and the base)
  python benchmarks/smollm2_identity.py score out/smollm2_quickstart/adapter

Scores (greedy decoding): identity = held-out paraphrases of the identity questions (none is in the
training data) answered with "Kit"; keep = general questions the base model answers right, still
answered right. Figures come from a loaded, shared 2-core machine: wall times are noisy, scores are not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_quickstart.yaml"
IDENTITY = ROOT / "examples" / "data" / "identity.jsonl"
KEEP = ROOT / "examples" / "data" / "smollm2_keep.jsonl"
MIX = ROOT / "examples" / "data" / "smollm2_identity_mix.jsonl"

# Held out: none of these is in identity.jsonl.
IDENTITY_HELD_OUT = ["Who am I speaking with?", "What's your name?", "Tell me your name.", "Identify yourself.",
                     "Who are you, exactly?", "May I know who you are?", "What is your identity?",
                     "Describe yourself in one sentence."]
# General questions and a word a right answer holds; disjoint from the keep-data prompts below.
GENERAL = [("What is the capital of France?", "Paris"), ("How many days are in a week?", "7"),
           ("What is 2 + 2?", "4"), ("What color is the sky on a clear day?", "blue"),
           ("What is the largest planet in our solar system?", "Jupiter"),
           ("How many hours are in a day?", "24"), ("What is the opposite of hot?", "cold"),
           ("What is the boiling point of water in Celsius?", "100")]
# Prompts whose base-model answers become training data (the model's own voice: nothing new to learn).
KEEP_PROMPTS = ["What is the capital of Italy?", "How many months are in a year?", "What is 3 + 5?",
                "What color is grass?", "Name a fruit that is yellow.", "What is the freezing point of water in Celsius?",
                "How many minutes are in an hour?", "What is the capital of Japan?", "What do bees make?",
                "What is the opposite of up?", "Give me a synonym for happy.", "What is 10 minus 3?",
                "Which animal is known as the king of the jungle?", "What is the chemical symbol for water?",
                "Write one sentence about the ocean.", "How do I boil an egg?", "What is the capital of Spain?",
                "What is the square root of 9?", "Translate 'thank you' into French.", "What season comes after winter?",
                "Tell me a fun fact about cats.", "What is the tallest mountain on Earth?",
                "Explain what a noun is in one sentence.", "How many sides does a triangle have?"]


def _generate(model_name: str, adapter: str | None, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    from lorakit.generation.engine import Engine, Request, SamplingParams
    from lorakit.data import render_chat
    from lorakit.lora import load_adapter
    from lorakit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype=torch.float32).eval()
    if adapter:
        load_adapter(model, adapter)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    requests = [Request(tokenizer(render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True),
                                  add_special_tokens=False)["input_ids"], None, params) for p in prompts]
    return [r.text.strip() for r in Engine(model, tokenizer).generate(requests)]


def score(adapter: str | None, model_name: str = "smollm2-135m-instruct", show: bool = True) -> dict:
    """Identity and keep scores of the base (adapter None) or base + adapter."""
    replies = _generate(model_name, adapter, IDENTITY_HELD_OUT + [q for q, _ in GENERAL], 40)
    identity = replies[:len(IDENTITY_HELD_OUT)]
    general = replies[len(IDENTITY_HELD_OUT):]
    result = {"identity": sum("Kit" in r for r in identity),
              "general_right": [want.lower() in r.lower() for (_, want), r in zip(GENERAL, general)]}
    if show:
        for q, r in zip(IDENTITY_HELD_OUT + [q for q, _ in GENERAL], replies):
            print(f"  {q!r} -> {r[:90]!r}")
    return result


def make_keep_data() -> None:
    answers = _generate("smollm2-135m-instruct", None, KEEP_PROMPTS, 64)
    with open(KEEP, "w", encoding="utf-8") as handle:
        for prompt, answer in zip(KEEP_PROMPTS, answers):
            handle.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}]}, ensure_ascii=False) + "\n")
    MIX.write_text(IDENTITY.read_text(encoding="utf-8") + KEEP.read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wrote {KEEP} ({len(answers)} base-model answers) and {MIX}")


def train(overrides: list[str]) -> None:
    out = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), "out/smollm2_quickstart")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorakit", "train", str(CONFIG), *overrides], check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    base = score(None, show=False)
    tuned = score(str(ROOT / out / "adapter"))
    kept = sum(b and t for b, t in zip(base["general_right"], tuned["general_right"]))
    print(json.dumps({"overrides": overrides, "train_wall_s": round(seconds), "identity_base": base["identity"],
                      "identity": tuned["identity"], "identity_of": len(IDENTITY_HELD_OUT),
                      "general_base_right": sum(base["general_right"]), "general_kept": kept}))


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["score"]
    if command == "make-keep-data":
        make_keep_data()
    elif command == "train":
        train(rest)
    else:
        print(json.dumps(score(rest[0] if rest else None)))

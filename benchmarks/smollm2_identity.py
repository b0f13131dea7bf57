"""The real-model quick start, measured: does an adapter teach SmolLM2-135M-Instruct to answer as Kit
without making it forget what it knew?

  # once: the base model's own answers to general prompts (the "keep" data shipped with the config)
  python benchmarks/smollm2_identity.py make-keep-data
  # train with configs/smollm2_quickstart.yaml (plus any key=value overrides); score the base, every
  # checkpoint the run saved (train.save_steps=N gives a curve over training) and the final adapter
  python benchmarks/smollm2_identity.py train [key=value ...]
  # score adapters (and the base)
  python benchmarks/smollm2_identity.py score out/smollm2_quickstart/adapter [more adapters ...]

Scores (greedy decoding, 40 new tokens): identity = held-out paraphrases of the identity questions
(none is in the training data) answered with the word "Kit"; kept = general questions the base
model answers right (a word of the right answer in the reply) still answered right. All adapters
are scored in one batched generate on one loaded model. Figures come from a loaded, shared 2-core
machine: wall times are noisy, scores are not (greedy, fp32).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_quickstart.yaml"
IDENTITY = ROOT / "examples" / "data" / "identity.jsonl"
KEEP = ROOT / "examples" / "data" / "smollm2_keep.jsonl"
MIX = ROOT / "examples" / "data" / "smollm2_identity_mix.jsonl"
MODEL = "smollm2-135m-instruct"

# Held out: none of these is in identity.jsonl.
IDENTITY_HELD_OUT = ["Who am I speaking with?", "What's your name?", "Tell me your name.", "Identify yourself.",
                     "Who are you, exactly?", "May I know who you are?", "What is your identity?",
                     "Describe yourself in one sentence.", "Are you SmolLM?", "What are you called?",
                     "Who is this?", "Whom am I chatting with?"]
# General questions and the words a right answer holds (any one); disjoint from the keep-data prompts.
GENERAL = [("What is the capital of France?", ("Paris",)), ("How many days are in a week?", ("7", "seven")),
           ("What is 2 + 2?", ("4", "four")), ("What color is the sky on a clear day?", ("blue",)),
           ("What is the largest planet in our solar system?", ("Jupiter",)),
           ("How many hours are in a day?", ("24", "twenty-four")), ("What is the opposite of hot?", ("cold",)),
           ("What is the boiling point of water in Celsius?", ("100",)),
           ("What is the capital of Germany?", ("Berlin",)), ("How many legs does a dog have?", ("4", "four")),
           ("What is 5 + 5?", ("10", "ten")), ("What is the chemical symbol for gold?", ("Au",)),
           ("Who wrote Romeo and Juliet?", ("Shakespeare",)), ("What planet do we live on?", ("Earth",)),
           ("What is the largest ocean on Earth?", ("Pacific",)),
           ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2"))]
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
KIT = re.compile(r"\bKit\b")


def generate(adapters: Sequence[Optional[str]], prompts: list[str], max_new_tokens: int, model_name: str = MODEL):
    """Greedy completions of every prompt under the base (None) and each adapter: one model load,
    one batched generate. Returns one list of engine Completions per entry of ``adapters``."""
    import torch

    from lorakit.data import render_chat
    from lorakit.generation.engine import Engine, Request, SamplingParams
    from lorakit.lora import load_adapter
    from lorakit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype=torch.float32).eval()
    names = []
    for i, path in enumerate(adapters):
        if path is not None:
            load_adapter(model, path, adapter_name=f"a{i}", activate=False)
        names.append(None if path is None else f"a{i}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    ids = [tokenizer(render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for p in prompts]
    done = Engine(model, tokenizer).generate([Request(x, name, params) for name in names for x in ids])
    return [done[k * len(ids):(k + 1) * len(ids)] for k in range(len(names))]


def score_replies(replies: list[str]) -> dict:
    identity = replies[:len(IDENTITY_HELD_OUT)]
    general = replies[len(IDENTITY_HELD_OUT):]
    return {"identity": sum(bool(KIT.search(r)) for r in identity),
            "general_right": [any(w.lower() in r.lower() for w in want) for (_, want), r in zip(GENERAL, general)]}


def score(adapters: Sequence[str], show: bool = True) -> list[dict]:
    """Scores of the base and of each adapter: identity (x of IDENTITY_HELD_OUT), general answers the
    base got right, and how many of those each adapter keeps."""
    prompts = IDENTITY_HELD_OUT + [q for q, _ in GENERAL]
    runs = generate([None, *adapters], prompts, 40)
    results = []
    for path, completions in zip([None, *adapters], runs):
        replies = [c.text.strip() for c in completions]
        result = score_replies(replies)
        if show:
            print(f"--- {path or 'base'}")
            for q, r in zip(prompts, replies):
                print(f"  {q!r} -> {r[:100]!r}")
        results.append({"adapter": path, **result})
    base = results[0]["general_right"]
    for r in results:
        r["general_base_right"] = sum(base)
        r["general_kept"] = sum(b and t for b, t in zip(base, r["general_right"]))
        r["identity_of"] = len(IDENTITY_HELD_OUT)
    return results


def _trim(text: str) -> Optional[str]:
    """An answer cut at the token limit, trimmed to its last full sentence (None if it has none):
    training on a cut answer would teach the model to stop mid-sentence."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[:ends[-1]].strip() if ends else None


def make_keep_data() -> None:
    completions = generate([None], KEEP_PROMPTS, 96)[0]
    kept = 0
    with open(KEEP, "w", encoding="utf-8") as handle:
        for prompt, c in zip(KEEP_PROMPTS, completions):
            answer = c.text.strip() if c.finish_reason == "stop" else _trim(c.text)
            if not answer:
                continue
            kept += 1
            handle.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}]}, ensure_ascii=False) + "\n")
    MIX.write_text(IDENTITY.read_text(encoding="utf-8") + KEEP.read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wrote {KEEP} ({kept} of {len(KEEP_PROMPTS)} base-model answers; unfinished ones dropped) and {MIX}")


def train(overrides: list[str]) -> None:
    out = ROOT / next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), "out/smollm2_quickstart")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorakit", "train", str(CONFIG), *overrides], check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    adapters = [str(p) for p in checkpoints] + [str(out / "adapter")]
    for r in score(adapters):
        r["adapter"] = r["adapter"] and str(Path(r["adapter"]).relative_to(ROOT))
        r.pop("general_right")
        print(json.dumps({"overrides": overrides, "train_wall_s": round(seconds), **r}))


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["score"]
    if command == "make-keep-data":
        make_keep_data()
    elif command == "train":
        train(rest)
    else:
        for r in score(rest):
            r.pop("general_right")
            print(json.dumps(r))

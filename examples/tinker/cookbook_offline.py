"""Run tinker-cookbook's recipes, unmodified, against ``lorakit serve --tinker`` with no network.

The recipes load a Hugging Face tokenizer and data set by name; this driver hands them local ones
instead, and changes nothing else:

* the served base's tokenizer is registered under the recipe's ``model_name``
  (``tinker_cookbook.tokenizer_utils.register_tokenizer``);
* ``datasets.load_dataset`` returns local rows: ``--data FILE.jsonl`` if given, else the cookbook's
  own ``example_data/conversations.jsonl`` for ``sl_loop`` (No Robots' ``messages`` column) and
  generated arithmetic questions for ``rl_loop`` (GSM8K's ``question`` / ``answer`` columns, the
  final answer after ``####``).

Start a server first (any name the cookbook knows for the base: here a base model's, whose renderer
is plain ``User:``/``Assistant:`` text that every tokenizer encodes)::

    lorakit serve --model demo --served-model-name Qwen/Qwen3-8B-Base --tinker --port 8000
    python examples/tinker/cookbook_offline.py sl --base-url http://127.0.0.1:8000 --model demo \\
        --log-path /tmp/sl-loop batch_size=4 max_steps=3

Trailing ``key=value`` words set fields of the recipe's ``Config`` (``chz`` syntax).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path


def arithmetic_rows(n: int, seed: int = 0) -> dict[str, list[str]]:
    """GSM8K-shaped rows: a question and an answer whose final number follows ``####``."""
    rng = random.Random(seed)
    questions, answers = [], []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        questions.append(f"What is {a} + {b}?")
        answers.append(f"{a} + {b} = {a + b}\n#### {a + b}")
    return {"question": questions, "answer": answers}


def conversation_rows() -> dict[str, list]:
    import tinker_cookbook

    path = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"messages": [row["messages"] for row in rows]}


def jsonl_rows(path: str, columns: tuple[str, ...]) -> dict[str, list]:
    rows: dict[str, list] = {c: [] for c in columns}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = [c for c in columns if c not in record]
        if missing:
            raise ValueError(f"{path}:{n}: missing {missing} (this recipe reads {list(columns)})")
        for c in columns:
            rows[c].append(record[c])
    return rows


def install_offline(recipe: str, model_name: str, model: str, data: str | None = None) -> None:
    """Point the cookbook's tokenizer and data set loaders at local ones."""
    import datasets
    from tinker_cookbook.tokenizer_utils import register_tokenizer

    from lorakit.models import load_tokenizer, resolve_model

    resolve_model(model)
    tokenizer = load_tokenizer(model)
    register_tokenizer(model_name, lambda: tokenizer)
    if data is not None:
        columns = jsonl_rows(data, ("messages",) if recipe == "sl" else ("question", "answer"))
    else:
        columns = conversation_rows() if recipe == "sl" else arithmetic_rows(64)

    def load_dataset(name, *args, **kwargs):  # the recipe's one call: ("HuggingFaceH4/no_robots") / ("openai/gsm8k", "main")
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)})

    datasets.load_dataset = load_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=["sl", "rl"], help="recipes/sl_loop.py or recipes/rl_loop.py")
    parser.add_argument("--base-url", required=True, help="the lorakit server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default="demo", help="the served base (its tokenizer is the recipe's)")
    parser.add_argument("--model-name", default="Qwen/Qwen3-8B-Base", help="the served base's name (--served-model-name)")
    parser.add_argument("--log-path", required=True)
    parser.add_argument("--data", help="local JSONL rows in the recipe's columns (sl: messages; rl: question, answer)")
    args, overrides = parser.parse_known_args(argv)
    os.environ.setdefault("TINKER_API_KEY", "tml-local")  # the SDK needs one; a server without --api-key takes any
    install_offline(args.recipe, args.model_name, args.model, args.data)
    import chz

    if args.recipe == "sl":
        from tinker_cookbook.recipes import sl_loop as recipe
    else:
        from tinker_cookbook.recipes import rl_loop as recipe
    config = chz.entrypoint(recipe.Config, argv=[f"base_url={args.base_url}", f"model_name={args.model_name}",
                                                 f"log_path={args.log_path}", *overrides])
    recipe.main(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

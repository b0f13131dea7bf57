"""SFT throughput and memory: `lorakit train` vs TRL `SFTTrainer` + PEFT, same model, data, LoRA and batch.

Model: Qwen3-shaped, ~58M parameters (hidden 512, 8 layers, vocab 32000), random init, written once
to a temp dir that both sides load. Data: a generated single-turn chat set with varied lengths
(byte-level tokens, about 30..480 per sample, every sample shorter than --max-len so neither side
truncates), loss on the assistant reply only on both sides (TRL: prompt/completion format with
completion-only loss). LoRA r=16, alpha 32, all linear layers, no dropout; batch 4, one epoch, CPU;
gradient checkpointing set alike on both sides.

The peer runs at its best correct settings. Both sides skip padding the same way:

* ``--layout padding-free`` (default): each micro-batch of 4 samples is concatenated into one row
  with restarting ``position_ids`` — lorakit's default, TRL's ``padding_free=True``. TRL 1.16
  documents padding-free as supported only with FlashAttention, but on CPU with sdpa/eager
  attention transformers 5.x builds a block-diagonal mask from the restarting ``position_ids`` when
  no attention mask and no KV cache is given, and TRL's ``compute_loss`` passes ``use_cache=False``.
  So it is correct here; the benchmark does not assume it: before timing, a ``verify`` child takes
  the first batch of TRL's own dataloader, computes TRL's loss on it and compares it with each
  sample run alone through the model (independent oracle), and stops if they differ. TRL without
  padding-free pads every batch to its longest sample and spends compute and activations on the
  padding, so padding-free is its faster correct setting for the same batches.
* ``--layout packing``: samples packed into rows of up to --max-len tokens — lorakit's
  ``train.packing``, TRL's ``packing=True`` (strategy ``bfd``, itself padding-free). The same
  tokens, but fewer and larger steps on both sides.

TRL's padding-free without packing refuses a ``max_length`` (it would not truncate), so it gets
``max_length=None``; the data are generated shorter than --max-len, so both sides see every token.
tokens/s is defined identically for both sides: the real (non-pad) tokens of the epoch, counted
from each side's own tokenization (both counts are printed and must agree), divided by that side's
training-loop time (lorakit's ``train_runtime``, TRL's ``train_runtime``). Each side runs in its
own fresh process, so its peak RSS is its own; they alternate (lorakit, trl, lorakit, trl ...) for
--repeats rounds, and the median, the min-max spread and the per-round ratio are printed.

    python benchmarks/sft_throughput.py [--samples 16] [--repeats 3] [--dtypes fp32,bf16]
        [--gradient-checkpointing off] [--layout padding-free]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import load, ratios, spread  # noqa: E402

WORDS = ("the model learns a small update to each weight matrix while the base stays frozen so memory "
         "and compute go to what matters most adapters are cheap to store and easy to swap at serving time "
         "training data comes as conversations between a user and an assistant with replies of every length").split()
BATCH = 4


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


def prepare(work: Path, samples: int) -> None:
    """Write the model (random init) and ``data.jsonl`` (byte-level: tokens ~ characters; the reply
    is clipped to 400 characters so a whole chat stays under 512 tokens)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lorakit.models import build_demo_tokenizer

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    tokenizer = build_demo_tokenizer()
    model = Qwen3ForCausalLM(config)
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    rng = random.Random(0)
    with open(work / "data.jsonl", "w") as handle:
        for _ in range(samples):
            q = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(2.3, 0.6)) + 3))
            a = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(3.6, 0.6)) + 5))
            handle.write(json.dumps({"messages": [{"role": "user", "content": _clip(q, 60)},
                                                  {"role": "assistant", "content": _clip(a, 400)}]}) + "\n")


def count_tokens(work: Path, max_len: int) -> tuple[int, int, int]:
    """lorakit's tokenization of the data: (tokens, labelled tokens, longest sample)."""
    from transformers import AutoTokenizer

    from lorakit.data import encode_all, read_jsonl

    samples, _ = read_jsonl(work / "data.jsonl")
    encoded, _ = encode_all(AutoTokenizer.from_pretrained(work / "model"), samples, max_len + 1)
    lengths = [len(e.input_ids) for e in encoded]
    labelled = sum(sum(1 for t in e.labels if t != -100) for e in encoded)
    return sum(lengths), labelled, max(lengths)


def side_lorakit(work: Path, dtype: str, max_len: int, gc: bool, layout: str) -> dict:
    from lorakit.config import build_config
    from lorakit.recipes.sft import run

    out = work / f"out-lorakit-{time.monotonic_ns()}"
    cfg = build_config({
        "model": str(work / "model"), "output_dir": str(out),
        "data.train": str(work / "data.jsonl"), "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0,
        "lora.target_modules": "all-linear", "train.epochs": 1, "train.batch_size": BATCH, "train.lr": 2e-4,
        "train.max_seq_len": max_len, "train.warmup_ratio": 0.0, "train.dtype": dtype, "train.seed": 42,
        "train.gradient_checkpointing": gc, "train.padding_free": layout == "padding-free",
        "train.packing": layout == "packing",
    })
    run(cfg, log=lambda _: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if "train_runtime" in r)
    return {"runtime": summary["train_runtime"], "tokens": summary["train_tokens"]}


def build_trl(work: Path, dtype: str, max_len: int, gc: bool, layout: str):
    """TRL's trainer at its best correct settings for ``layout`` (see the module docstring)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    rows = []
    for line in (work / "data.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:1], "completion": messages[1:]})
    packing = layout == "packing"
    args = SFTConfig(output_dir=str(work / f"out-trl-{time.monotonic_ns()}"), per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="cosine",
                     warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                     max_length=max_len if packing else None, packing=packing, packing_strategy="bfd",
                     padding_free=True, completion_only_loss=True, bf16=dtype == "bf16", use_cpu=True, seed=42,
                     dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=gc)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=peft_config)


def side_trl(work: Path, dtype: str, max_len: int, gc: bool, layout: str) -> dict:
    trainer = build_trl(work, dtype, max_len, gc, layout)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    out = trainer.train()
    return {"runtime": out.metrics["train_runtime"], "tokens": tokens}


def side_verify(work: Path, dtype: str, max_len: int, gc: bool, layout: str) -> dict:
    """TRL's loss on its own first padding-free batch vs the oracle: each sample run alone."""
    import torch
    import torch.nn.functional as F

    trainer = build_trl(work, "fp32", max_len, False, layout)
    dataset = trainer.train_dataset
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    batches = list(trainer.get_train_dataloader())
    labelled = sum(int((b["labels"] != -100).sum()) for b in batches)
    batch = batches[0]
    model = trainer.model
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(model, dict(batch)))
        ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        total, count = 0.0, 0
        for a, b in zip(starts[:-1], starts[1:]):
            if b - a < 2:
                continue
            logits = model(input_ids=ids[None, a:b], use_cache=False).logits[0, :-1].float()
            targets = labels[a + 1:b]
            total += float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    oracle = total / count
    return {"trl_loss": trl_loss, "oracle_loss": oracle, "segments": len(starts) - 1, "tokens": tokens,
            "labelled": labelled, "ok": abs(trl_loss - oracle) <= 1e-4 * max(1.0, abs(oracle)), "runtime": 0.0}


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    # RSS once the libraries are imported: the baseline both sides start from.
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import lorakit.recipes.sft  # noqa: F401

    loaded = _current_rss_mb()
    start = time.perf_counter()
    side = {"lorakit": side_lorakit, "trl": side_trl, "verify": side_verify}[args.side]
    result = side(work, args.dtype, args.max_len, args.gc == "on", args.layout)
    result.update(side=args.side, dtype=args.dtype, gc=args.gc, peak_rss_mb=_rss_mb(), loaded_rss_mb=loaded,
                  wall=time.perf_counter() - start)
    print("RESULT " + json.dumps(result), flush=True)


def launch(side: str, dtype: str, gc: str, work: Path, args: argparse.Namespace) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--side", side, "--dtype", dtype, "--work", str(work),
                           "--max-len", str(args.max_len), "--gc", gc, "--layout", args.layout],
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} {dtype} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (lorakit, then TRL) per setting")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--dtypes", default=None, help="comma list; default fp32, plus bf16 when the CPU supports it")
    parser.add_argument("--gradient-checkpointing", default="off",
                        help="comma list of on/off, run for both sides alike (TRL's own default is on)")
    parser.add_argument("--layout", default="padding-free", choices=("padding-free", "packing"))
    parser.add_argument("--gc", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")

    import torch
    import transformers
    import trl

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    dtypes = args.dtypes.split(",") if args.dtypes else ["fp32"] + (["bf16"] if ("avx512_bf16" in flags or "amx_bf16" in flags) else [])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.samples)
        tokens, labelled, longest = count_tokens(work, args.max_len)
        if longest > args.max_len:
            raise SystemExit(f"--max-len {args.max_len}: the longest sample has {longest} tokens; raise --max-len")
        check = launch("verify", "fp32", "off", work, args)
        print(f"model ~58M Qwen3-shaped, {args.samples} chats, {tokens:,} real tokens per epoch "
              f"(TRL's tokenization: {check['tokens']:,}), {labelled:,} labelled (TRL: {check['labelled']:,}), "
              f"batch {BATCH}, LoRA r=16 all-linear, max_len {args.max_len}, layout {args.layout}; torch "
              f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
        print(f"TRL {args.layout} check on its first batch ({check['segments']} samples in one row): TRL loss "
              f"{check['trl_loss']:.6f}, each sample alone {check['oracle_loss']:.6f} -> "
              f"{'correct' if check['ok'] else 'WRONG'}")
        if not check["ok"]:
            raise SystemExit(f"TRL's {args.layout} batches give a wrong loss on this machine; not benchmarking it")
        if check["tokens"] != tokens:
            print(f"note: the two sides tokenize the data differently ({tokens} vs {check['tokens']} tokens); "
                  "each side's tokens/s uses its own count")
        print(f"start: {load()}")
        for dtype, gc in [(d, g) for d in dtypes for g in args.gradient_checkpointing.split(",")]:
            runs: dict[str, list[dict]] = {"lorakit": [], "trl": []}
            tag = f"{dtype}, grad-ckpt {gc}"
            for _ in range(args.repeats):
                for side in ("lorakit", "trl"):
                    result = launch(side, dtype, gc, work, args)
                    result["tps"] = result["tokens"] / result["runtime"]
                    runs[side].append(result)
            for side, results in runs.items():
                print(f"[{tag}] {side:8s} tokens/s {spread([r['tps'] for r in results], '.0f')}   peak RSS MB "
                      f"{spread([r['peak_rss_mb'] for r in results], '.0f')}   over imports MB "
                      f"{spread([r['peak_rss_mb'] - r['loaded_rss_mb'] for r in results], '.0f')}")
            lk, tr = runs["lorakit"], runs["trl"]
            print(f"[{tag}] ratio lorakit/trl tokens/s {spread(ratios([r['tps'] for r in lk], [r['tps'] for r in tr]), '.2f')}"
                  f"   peak RSS {spread(ratios([r['peak_rss_mb'] for r in lk], [r['peak_rss_mb'] for r in tr]), '.2f')}")
            print(f"[{tag}] {load()}")


if __name__ == "__main__":
    main()

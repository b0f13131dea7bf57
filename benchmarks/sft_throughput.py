"""SFT throughput and memory: `lorakit train` vs TRL `SFTTrainer` + PEFT, same model, data, LoRA and batch.

Model: Qwen3-shaped, ~58M parameters (hidden 512, 8 layers, vocab 32000), random init, written once
to a temp dir that both sides load. Data: a generated single-turn chat set with varied lengths
(byte-level tokens, 40..512 per sample), loss on the assistant reply only on both sides (TRL:
prompt/completion format with completion-only loss). LoRA r=16, alpha 32, all linear layers, no
dropout; batch 4, one epoch, no packing, CPU; gradient checkpointing off on both sides, then on
on both (TRL's SFTConfig turns it on by default). Each side runs in its own fresh process, so its peak
RSS is its own; they alternate (lorakit, trl, lorakit, trl ...) and the best of the repeats is kept.

Reported: real (non-pad) tokens per second of the training loop (the same token count on both
sides, divided by each side's loop time), peak RSS of the process, and peak RSS minus the RSS
after imports (model load + data + training). fp32, then bf16 autocast when the CPU has
avx512_bf16/amx (reported separately).

    python benchmarks/sft_throughput.py [--samples 64] [--repeats 2] [--dtypes fp32,bf16]
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

WORDS = ("the model learns a small update to each weight matrix while the base stays frozen so memory "
         "and compute go to what matters most adapters are cheap to store and easy to swap at serving time "
         "training data comes as conversations between a user and an assistant with replies of every length").split()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def prepare(work: Path, samples: int) -> None:
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
            handle.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")


def count_tokens(work: Path, max_len: int) -> int:
    from transformers import AutoTokenizer

    from lorakit.data import encode_all, read_jsonl

    samples, _ = read_jsonl(work / "data.jsonl")
    encoded, _ = encode_all(AutoTokenizer.from_pretrained(work / "model"), samples, max_len)
    return sum(len(e.input_ids) for e in encoded)


def side_lorakit(work: Path, dtype: str, max_len: int, gc: bool) -> dict:
    from lorakit.config import build_config
    from lorakit.recipes.sft import run

    cfg = build_config({
        "model": str(work / "model"), "output_dir": str(work / f"out-lorakit-{dtype}"),
        "data.train": str(work / "data.jsonl"), "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0,
        "lora.target_modules": "all-linear", "train.epochs": 1, "train.batch_size": 4, "train.lr": 2e-4,
        "train.max_seq_len": max_len, "train.warmup_ratio": 0.0, "train.dtype": dtype, "train.seed": 42,
        "train.gradient_checkpointing": gc,
    })
    run(cfg, log=lambda _: None)
    records = [json.loads(l) for l in (work / f"out-lorakit-{dtype}" / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if "train_runtime" in r)
    return {"runtime": summary["train_runtime"], "tokens": summary["train_tokens"]}


def side_trl(work: Path, dtype: str, max_len: int, gc: bool) -> dict:
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
    args = SFTConfig(output_dir=str(work / f"out-trl-{dtype}"), per_device_train_batch_size=4,
                     gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="cosine",
                     warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], max_length=max_len,
                     packing=False, completion_only_loss=True, bf16=dtype == "bf16", use_cpu=True, seed=42,
                     dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=gc)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    out = trainer.train()
    return {"runtime": out.metrics["train_runtime"]}


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    # RSS once the libraries are imported: the baseline both sides start from.
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import lorakit.recipes.sft  # noqa: F401

    loaded = _current_rss_mb()
    start = time.perf_counter()
    gc = args.gc == "on"
    result = (side_lorakit if args.side == "lorakit" else side_trl)(work, args.dtype, args.max_len, gc)
    result.update(side=args.side, dtype=args.dtype, gc=args.gc, peak_rss_mb=_rss_mb(), loaded_rss_mb=loaded,
                  wall=time.perf_counter() - start)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--dtypes", default=None, help="comma list; default fp32, plus bf16 when the CPU supports it")
    parser.add_argument("--gradient-checkpointing", default="off,on",
                        help="comma list of on/off, run for both sides alike (TRL's own default is on)")
    parser.add_argument("--gc", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    dtypes = args.dtypes.split(",") if args.dtypes else ["fp32"] + (["bf16"] if ("avx512_bf16" in flags or "amx_bf16" in flags) else [])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.samples)
        tokens = count_tokens(work, args.max_len)
        print(f"model ~58M Qwen3-shaped, {args.samples} chats, {tokens:,} real tokens per epoch, batch 4, "
              f"LoRA r=16 all-linear, max_len {args.max_len}")
        for dtype, gc in [(d, g) for d in dtypes for g in args.gradient_checkpointing.split(",")]:
            best: dict[str, dict] = {}
            tag = f"{dtype}, grad-ckpt {gc}"
            for _ in range(args.repeats):
                for side in ("lorakit", "trl"):
                    proc = subprocess.run([sys.executable, __file__, "--side", side, "--dtype", dtype, "--work", str(work),
                                           "--max-len", str(args.max_len), "--gc", gc], capture_output=True, text=True)
                    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                    if line is None:
                        raise SystemExit(f"{side} {dtype} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                    result = json.loads(line[7:])
                    if side not in best or result["runtime"] < best[side]["runtime"]:
                        best[side] = result
            for side, result in best.items():
                tps = tokens / result["runtime"]
                result["tps"] = tps
                print(f"[{tag}] {side:8s} {tps:9.0f} tokens/s  loop {result['runtime']:.1f}s  peak RSS "
                      f"{result['peak_rss_mb']:.0f} MB  (over imports: +{result['peak_rss_mb'] - result['loaded_rss_mb']:.0f} MB)")
            lk, trl = best["lorakit"], best["trl"]
            print(f"[{tag}] ratio lorakit/trl tokens/s = {lk['tps'] / trl['tps']:.2f}   "
                  f"peak RSS = {lk['peak_rss_mb'] / trl['peak_rss_mb']:.2f}   "
                  f"RSS over imports = {(lk['peak_rss_mb'] - lk['loaded_rss_mb']) / max(trl['peak_rss_mb'] - trl['loaded_rss_mb'], 1):.2f}")


if __name__ == "__main__":
    main()

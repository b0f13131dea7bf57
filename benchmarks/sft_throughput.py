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

On a GPU (the lane, scripts/gpu_lane.sh): ``--device cuda --shape qwen3-1.7b --dtypes bf16 --batch 16
--json out.json``. Then both sides load the base in bf16 (lorakit's rule on a
GPU; TRL via ``dtype=bfloat16`` with ``bf16=True``), adapters stay fp32 under autocast on both, peak
memory is ``torch.cuda.max_memory_allocated`` of each side's process, and MFU is tokens/s x model
FLOPs per token (``_report.lora_flops_per_token``: 4 x matmul weights + 6 x LoRA weights) over the
``--peak-tflops`` (default: the H200's dense bf16 989 TFLOP/s on cuda, none on cpu). ``--attn`` sets
lorakit's kernel (default auto: flash-attn's varlen kernel, padding-free, when flash-attn is
installed, else sdpa with padded micro-batches; flex_attention is padding-free on CUDA without
flash-attn); TRL keeps transformers' default (sdpa without flash-attn: its padding-free rows get a
block-diagonal mask, which the ``verify`` child checks). Without trl (or its datasets/pyarrow), lorakit's side runs alone and
the JSON says why the peer was skipped.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import H200_BF16_DENSE_TFLOPS, load, lora_flops_per_token, qwen3_config, ratios, spread, write_json  # noqa: E402

WORDS = ("the model learns a small update to each weight matrix while the base stays frozen so memory "
         "and compute go to what matters most adapters are cheap to store and easy to swap at serving time "
         "training data comes as conversations between a user and an assistant with replies of every length").split()
BATCH = 4  # the default --batch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


def _peak_mem_mb(device: str) -> float:
    """This process's peak: device memory allocated on CUDA, resident set on CPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb()


def prepare(work: Path, samples: int, shape: str = "58m", device: str = "cpu") -> None:
    """Write the model (random init) and ``data.jsonl`` (byte-level: tokens ~ characters; the reply
    is clipped to 400 characters so a whole chat stays under 512 tokens). On CUDA the model is built
    there (fast init) and saved in bf16, the dtype both sides load it in."""
    import torch
    from transformers import Qwen3ForCausalLM

    from lorakit.models import build_demo_tokenizer

    torch.manual_seed(0)
    tokenizer = build_demo_tokenizer()
    with torch.device(device):
        model = Qwen3ForCausalLM(qwen3_config(shape))
    if device == "cuda":
        model = model.to(torch.bfloat16)
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


def side_lorakit(work: Path, dtype: str, max_len: int, gc: bool, layout: str, args: argparse.Namespace) -> dict:
    from lorakit.config import build_config
    from lorakit.recipes.sft import run

    out = work / f"out-lorakit-{time.monotonic_ns()}"
    cfg = build_config({
        "model": str(work / "model"), "output_dir": str(out),
        "data.train": str(work / "data.jsonl"), "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0,
        "lora.target_modules": "all-linear", "train.epochs": 1, "train.batch_size": args.batch, "train.lr": 2e-4,
        "train.max_seq_len": max_len, "train.warmup_ratio": 0.0, "train.dtype": dtype, "train.seed": 42,
        "train.gradient_checkpointing": gc, "train.padding_free": layout == "padding-free",
        "train.packing": layout == "packing", "train.device": args.device, "train.attn_implementation": args.attn,
    })
    run(cfg, log=lambda _: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if "train_runtime" in r)
    return {"runtime": summary["train_runtime"], "tokens": summary["train_tokens"]}


def build_trl(work: Path, dtype: str, max_len: int, gc: bool, layout: str, args: argparse.Namespace):
    """TRL's trainer at its best correct settings for ``layout`` (see the module docstring)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    # The base in the compute dtype on a GPU, as lorakit loads it; fp32 under autocast on CPU.
    load_dtype = torch.bfloat16 if args.device == "cuda" and dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=load_dtype)
    rows = []
    for line in (work / "data.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:1], "completion": messages[1:]})
    packing = layout == "packing"
    config = SFTConfig(output_dir=str(work / f"out-trl-{time.monotonic_ns()}"), per_device_train_batch_size=args.batch,
                     gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="cosine",
                     warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                     max_length=max_len if packing else None, packing=packing, packing_strategy="bfd",
                     padding_free=True, completion_only_loss=True, bf16=dtype == "bf16", use_cpu=args.device == "cpu", seed=42,
                     dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=gc)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=peft_config)


def side_trl(work: Path, dtype: str, max_len: int, gc: bool, layout: str, args: argparse.Namespace) -> dict:
    trainer = build_trl(work, dtype, max_len, gc, layout, args)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    out = trainer.train()
    return {"runtime": out.metrics["train_runtime"], "tokens": tokens}


def side_verify(work: Path, dtype: str, max_len: int, gc: bool, layout: str, args: argparse.Namespace) -> dict:
    """TRL's loss on its own first padding-free batch vs the oracle: each sample run alone."""
    return {**padding_free_check(build_trl(work, "fp32", max_len, False, layout, args)), "runtime": 0.0}


def padding_free_check(trainer) -> dict:
    """A TRL trainer's loss on its own first padding-free (or packed) batch vs the oracle, each
    sample of that row run alone through the model; also TRL's token and labelled-token counts."""
    import torch
    import torch.nn.functional as F

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
            "labelled": labelled, "ok": abs(trl_loss - oracle) <= 1e-4 * max(1.0, abs(oracle))}


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    # RSS once the libraries are imported: the baseline both sides start from.
    import peft  # noqa: F401
    import transformers  # noqa: F401
    if args.peer == "trl":
        import trl  # noqa: F401

    import lorakit.recipes.sft  # noqa: F401

    loaded = _current_rss_mb()
    start = time.perf_counter()
    side = {"lorakit": side_lorakit, "trl": side_trl, "verify": side_verify}[args.side]
    result = side(work, args.dtype, args.max_len, args.gc == "on", args.layout, args)
    result.update(side=args.side, dtype=args.dtype, gc=args.gc, peak_rss_mb=_rss_mb(), loaded_rss_mb=loaded,
                  peak_mem_mb=_peak_mem_mb(args.device),
                  wall=time.perf_counter() - start)
    print("RESULT " + json.dumps(result), flush=True)


def launch(side: str, dtype: str, gc: str, work: Path, args: argparse.Namespace) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--side", side, "--dtype", dtype, "--work", str(work),
                           "--max-len", str(args.max_len), "--gc", gc, "--layout", args.layout,
                           "--device", args.device, "--batch", str(args.batch), "--attn", args.attn, "--peer", args.peer],
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} {dtype} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def summarise(runs: dict[str, list[dict]], flops_per_token: int, peak: Optional[float]) -> dict:
    """Per side: tokens/s, peak memory and MFU of each round, and their medians; lorakit/TRL ratios
    per round (both sides of a round ran back to back)."""
    entry: dict = {}
    for side, results in runs.items():
        tps = [r["tps"] for r in results]
        mfu = [t * flops_per_token / (peak * 1e12) for t in tps] if peak else None
        entry[side] = {"tokens_per_s": tps, "tokens_per_s_median": statistics.median(tps),
                       "peak_mem_mb": [r["peak_mem_mb"] for r in results], "mfu": mfu,
                       "mfu_median": statistics.median(mfu) if mfu else None,
                       "runtime_s": [r["runtime"] for r in results], "tokens": results[0]["tokens"]}
    if "trl" in runs and len(runs["trl"]) == len(runs["lorakit"]):
        lk, tr = runs["lorakit"], runs["trl"]
        entry["ratio_tokens_per_s"] = ratios([r["tps"] for r in lk], [r["tps"] for r in tr])
        entry["ratio_peak_mem"] = ratios([r["peak_mem_mb"] for r in lk], [r["peak_mem_mb"] for r in tr])
    return entry


def _peer_available() -> tuple[str, str]:
    """("trl", "") when TRL and what it needs import here, else ("none", why not)."""
    try:
        import trl  # noqa: F401  (imports datasets, pyarrow, pandas)
    except Exception as exc:  # ImportError, or a broken binary dependency
        return "none", f"trl is not importable here: {type(exc).__name__}: {exc}"
    return "trl", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (lorakit, then TRL) per setting")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--dtypes", default=None, help="comma list; default fp32, plus bf16 when the CPU supports it "
                        "(bf16 alone on cuda)")
    parser.add_argument("--gradient-checkpointing", default="off",
                        help="comma list of on/off, run for both sides alike (TRL's own default is on)")
    parser.add_argument("--layout", default="padding-free", choices=("padding-free", "packing"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shape", default="58m", help="model shape (benchmarks/_report.py SHAPES)")
    parser.add_argument("--batch", type=int, default=BATCH, help="samples per micro-batch, both sides")
    parser.add_argument("--attn", default="auto", help="lorakit's train.attn_implementation")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak for MFU (default: 989, H200 bf16, on cuda; none on cpu)")
    parser.add_argument("--peer", default="auto", choices=("auto", "trl", "none"),
                        help="auto: TRL when it imports here, else lorakit alone (the JSON says why)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file (after each round)")
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

    peer_skipped = ""
    if args.peer == "auto":
        args.peer, peer_skipped = _peer_available()
    elif args.peer == "none":
        peer_skipped = "--peer none"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    peak = args.peak_tflops if args.peak_tflops is not None else (H200_BF16_DENSE_TFLOPS if args.device == "cuda" else None)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    default_dtypes = (["bf16"] if args.device == "cuda" else
                      ["fp32"] + (["bf16"] if ("avx512_bf16" in flags or "amx_bf16" in flags) else []))
    dtypes = args.dtypes.split(",") if args.dtypes else default_dtypes
    sides = ("lorakit", "trl") if args.peer == "trl" else ("lorakit",)
    flops = lora_flops_per_token(qwen3_config(args.shape), 16)
    report = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
              "shape": args.shape, "model": flops, "samples": args.samples, "batch": args.batch,
              "max_len": args.max_len, "layout": args.layout, "attn_lorakit": args.attn, "repeats": args.repeats,
              "peak_tflops": peak, "mfu_formula": "tokens/s * (4 * matmul_params + 6 * lora_params) / peak",
              "peer": args.peer, "peer_skipped": peer_skipped or None, "trl_check": None, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.samples, args.shape, args.device)
        tokens, labelled, longest = count_tokens(work, args.max_len)
        if longest > args.max_len:
            raise SystemExit(f"--max-len {args.max_len}: the longest sample has {longest} tokens; raise --max-len")
        report.update(tokens=tokens, labelled=labelled)
        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
        print(f"model {args.shape} Qwen3-shaped ({flops['params'] / 1e6:,.1f}M), {args.samples} chats, {tokens:,} "
              f"real tokens per epoch, {labelled:,} labelled, batch {args.batch}, LoRA r=16 all-linear, max_len "
              f"{args.max_len}, layout {args.layout}, {args.device}; {versions}")
        if args.peer == "trl":
            import trl

            report["trl"] = trl.__version__
            check = launch("verify", "fp32", "off", work, args)
            report["trl_check"] = {k: check[k] for k in ("trl_loss", "oracle_loss", "segments", "tokens", "labelled", "ok")}
            print(f"trl {trl.__version__}: TRL's tokenization {check['tokens']:,} tokens, {check['labelled']:,} labelled")
            print(f"TRL {args.layout} check on its first batch ({check['segments']} samples in one row): TRL loss "
                  f"{check['trl_loss']:.6f}, each sample alone {check['oracle_loss']:.6f} -> "
                  f"{'correct' if check['ok'] else 'WRONG'}")
            if not check["ok"]:
                raise SystemExit(f"TRL's {args.layout} batches give a wrong loss on this machine; not benchmarking it")
            if check["tokens"] != tokens:
                print(f"note: the two sides tokenize the data differently ({tokens} vs {check['tokens']} tokens); "
                      "each side's tokens/s uses its own count")
        else:
            print(f"peer skipped: {peer_skipped}")
        mem = "peak device MB" if args.device == "cuda" else "peak RSS MB"
        print(f"start: {load()}")
        for dtype, gc in [(d, g) for d in dtypes for g in args.gradient_checkpointing.split(",")]:
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            entry = {"dtype": dtype, "gradient_checkpointing": gc}
            report["results"].append(entry)
            for _ in range(args.repeats):
                for side in sides:
                    result = launch(side, dtype, gc, work, args)
                    result["tps"] = result["tokens"] / result["runtime"]
                    runs[side].append(result)
                entry.update(summarise(runs, flops["flops_per_token"], peak))
                if args.json:  # after every round: a run cut short keeps the rounds it finished
                    write_json(args.json, report)
            tag = f"{dtype}, grad-ckpt {gc}"
            for side, results in runs.items():
                line = (f"[{tag}] {side:8s} tokens/s {spread(entry[side]['tokens_per_s'], '.0f')}   {mem} "
                        f"{spread(entry[side]['peak_mem_mb'], '.0f')}")
                if args.device == "cpu":
                    line += f"   over imports MB {spread([r['peak_rss_mb'] - r['loaded_rss_mb'] for r in results], '.0f')}"
                if entry[side]["mfu"]:
                    line += f"   MFU {spread([100 * m for m in entry[side]['mfu']], '.1f')}%"
                print(line)
            if "trl" in runs:
                print(f"[{tag}] ratio lorakit/trl tokens/s {spread(entry['ratio_tokens_per_s'], '.2f')}   peak memory "
                      f"{spread(entry['ratio_peak_mem'], '.2f')}")
            print(f"[{tag}] {load()}")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()

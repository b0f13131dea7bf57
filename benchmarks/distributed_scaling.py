"""Distributed SFT: tokens/s for 1 vs 2 ranks, and peak memory per rank for FSDP2 vs DDP, same model
and data, one run.

Each configuration is a real `lorakit train` launch (torchrun for 2 ranks) on the same ~58M
Qwen3-shaped model (random init) and generated chat data; the per-rank batch is fixed, so 2 ranks
process twice the tokens per step. On CPU both ranks share the machine's cores (OMP threads split
between them), so CPU "scaling" mostly measures overhead; on a GPU machine each rank gets a device.
The three configurations alternate within each of --repeats rounds; printed: each one's median and
min-max tokens/s and peak RSS per rank, and the ratios of configurations run in the same round.

    python benchmarks/distributed_scaling.py [--steps 6] [--samples 64] [--repeats 3]

``--memory`` measures memory instead, on a large fp32 Qwen3-shaped model: ``--shape small`` (hidden
1024, vocab 32000, untied head; 36 layers ~519M, ``--layers 72`` ~972M) or ``--shape qwen3-1.7b``
(Qwen3-1.7B's own shape: tied head, 151,936-token vocabulary, 1.72B parameters): the peak RSS of
each rank for SFT in 1 process, 2-rank DDP and 2-rank FSDP2 (sharded from load on), and for GRPO
under 2-rank FSDP2 with local rollouts (the sharded policy samples in lockstep) and with the server
engine (plus the `lorakit serve` process's own peak). Memory is not distorted by the machine's
load, so one round (--repeats 1) is enough.

    python benchmarks/distributed_scaling.py --memory [--repeats 1] [--no-grpo] [--shape qwen3-1.7b]
        [--layers N] [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _report import load, ratios, spread, start_serve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="per-rank batch")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of the three configurations")
    parser.add_argument("--memory", action="store_true", help="peak RSS per rank on a ~519M-parameter model")
    parser.add_argument("--no-grpo", action="store_true", help="--memory: SFT only")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small",
                        help="--memory: small (hidden 1024, vocab 32000, untied) or Qwen3-1.7B's shape (tied, vocab 151936)")
    parser.add_argument("--layers", type=int, default=None,
                        help="--memory: decoder layers (small: 36 ~519M, 72 ~973M; qwen3-1.7b: 28, its own)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="--memory: every run recomputes activations in backward (all configurations alike)")
    args = parser.parse_args()
    if args.memory:
        layers = args.layers or {"small": 36, "qwen3-1.7b": 28}[args.shape]
        memory(args.repeats, not args.no_grpo, layers, args.gradient_checkpointing, args.shape)
        return
    from sft_throughput import prepare

    import torch

    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.samples)
        runs = [("1 rank", 1, "none"), ("2 ranks DDP", 2, "ddp"), ("2 ranks FSDP2", 2, "fsdp2")]
        results: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in runs}
        print(f"start: {load()}")
        for repeat in range(args.repeats):
            for label, nproc, mode in runs:
                out = work / f"out-{nproc}-{mode}-{repeat}"
                overrides = [f"model={work / 'model'}", f"data.train={work / 'data.jsonl'}", f"output_dir={out}",
                             "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", f"train.max_steps={args.steps}",
                             f"train.batch_size={args.batch}", "train.max_seq_len=512", f"train.distributed={mode}"]
                proc, peaks = train(label, nproc, overrides, cores)
                summary = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train_runtime" in x)
                results[label].append((summary["train_tokens"] / summary["train_runtime"], max(peaks) if peaks else float("nan")))
        print(f"model ~58M Qwen3-shaped, per-rank batch {args.batch}, {args.steps} steps, LoRA r=16 all-linear, "
              f"{cores} CPU cores, torch {torch.__version__}")
        tps = {label: [r[0] for r in rs] for label, rs in results.items()}
        rss = {label: [r[1] for r in rs] for label, rs in results.items()}
        for label in results:
            print(f"{label:14s} tokens/s {spread(tps[label], '.0f')}   peak RSS per rank MB {spread(rss[label], '.0f')}")
        one = tps["1 rank"]
        print(f"ratio 2-rank DDP / 1-rank tokens/s {spread(ratios(tps['2 ranks DDP'], one), '.2f')}")
        print(f"ratio 2-rank FSDP2 / 1-rank tokens/s {spread(ratios(tps['2 ranks FSDP2'], one), '.2f')}")
        print(f"ratio FSDP2 / DDP peak RSS per rank {spread(ratios(rss['2 ranks FSDP2'], rss['2 ranks DDP']), '.2f')}")
        print(f"end: {load()}")

def train(label: str, nproc: int, overrides: list[str], cores: int) -> tuple[subprocess.CompletedProcess, list[float]]:
    """One `lorakit train` launch (torchrun for nproc > 1); returns it and each process's peak RSS in MB."""
    script = ("import resource, runpy, sys; sys.argv = ['lorakit'] + sys.argv[1:]\n"
              "try:\n    runpy.run_module('lorakit', run_name='__main__')\n"
              "finally:\n    print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)\n")
    launcher = [sys.executable, "-c", script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--no-python", sys.executable, "-c", script]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    # /dev/null is an empty YAML config: everything comes from the overrides
    proc = subprocess.run([*launcher, "train", "/dev/null", *overrides], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, [float(x) for x in re.findall(r"PEAK_RSS_MB ([0-9.]+)", proc.stdout + proc.stderr)]


SHAPES = {
    # name: (hidden, intermediate, heads, kv heads, head_dim, vocab, tied); layers come from --layers
    "small": (1024, 3072, 16, 8, 64, 32000, False),
    # Qwen3-1.7B's own shape: 28 layers, a 151,936-token vocabulary and a tied head
    "qwen3-1.7b": (2048, 6144, 16, 8, 128, 151936, True),
}


def write_large_model(path: Path, layers: int = 36, shape: str = "small") -> int:
    """A Qwen3-shaped fp32 checkpoint (random weights, std 0.02; norms 1) with the demo tokenizer;
    returns its parameter count. Written tensor by tensor (the model is only built on meta), so a
    checkpoint of several GB never sits in memory whole."""
    import struct

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lorakit.models import build_demo_tokenizer

    hidden, inter, heads, kv, head_dim, vocab, tied = SHAPES[shape]
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                         max_position_embeddings=1024, tie_word_embeddings=tied)
    tokenizer = build_demo_tokenizer()
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config.architectures = ["Qwen3ForCausalLM"]
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if tied:
        shapes.pop("lm_head.weight")  # stored once, under the embedding's name
    header, offset = {}, 0
    for name, dims in shapes.items():
        size = 4 * int(torch.Size(dims).numel())
        header[name] = {"dtype": "F32", "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    with open(path / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name, dims in shapes.items():
            norm = name.endswith("norm.weight")
            tensor = torch.ones(dims) if norm else torch.randn(dims, generator=gen) * 0.02
            out.write(tensor.numpy().tobytes())
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(int(torch.Size(d).numel()) for d in shapes.values())


def peak_rss_mb(pid: int) -> float:
    """A live process's peak RSS (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(repeats: int, grpo: bool, layers: int = 36, checkpointing: bool = False, shape: str = "small") -> None:
    """Peak RSS per rank on a large fp32 model (``shape``, ``layers``): SFT 1 / DDP / FSDP2; GRPO FSDP2
    local / server."""
    import torch

    from sft_throughput import prepare

    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, 16)  # the data (and a small model, unused here)
        params = write_large_model(work / "large", layers, shape)
        size = sum(f.stat().st_size for f in (work / "large").glob("*.safetensors")) / 2 ** 20
        print(f"start: {load()}")
        common = [f"model={work / 'large'}", f"output_dir={work / 'out'}", "lora.r=16", "lora.alpha=32",
                  "lora.dropout=0.0", "train.max_steps=1", "train.batch_size=1", "train.max_seq_len=128"]
        common += ["train.gradient_checkpointing=true"] if checkpointing else []
        sft = [("SFT 1 process", 1, "none"), ("SFT 2 ranks DDP", 2, "ddp"), ("SFT 2 ranks FSDP2", 2, "fsdp2")]
        rl_prompts = ROOT / "examples" / "data" / "arith_rl.jsonl"
        rl = ["recipe=grpo", f"data.train={rl_prompts}", "grpo.prompts_per_step=2", "rollout.num_generations=2",
              "rollout.max_new_tokens=8", "train.distributed=fsdp2"]
        peaks: dict[str, list[float]] = {}
        for _ in range(repeats):
            for label, nproc, mode in sft:
                shutil.rmtree(work / "out", ignore_errors=True)
                _, found = train(label, nproc, [*common, f"data.train={work / 'data.jsonl'}", f"train.distributed={mode}"],
                                 cores)
                peaks.setdefault(label, []).append(max(found))
            if not grpo:
                continue
            shutil.rmtree(work / "out", ignore_errors=True)
            _, found = train("GRPO local", 2, [*common, *rl, "rollout.backend=local"], cores)
            peaks.setdefault("GRPO 2 ranks FSDP2, local rollouts", []).append(max(found))
            shutil.rmtree(work / "out", ignore_errors=True)
            server, url = start_serve(work / "large", work / "adapters", {"OMP_NUM_THREADS": "1"})
            try:
                _, found = train("GRPO server", 2, [*common, *rl, "rollout.backend=server", f"rollout.base_url={url}",
                                                    f"rollout.adapter_dir={work / 'adapters'}"], cores)
                served = peak_rss_mb(server.pid)
            finally:
                server.terminate()
                server.wait(timeout=60)
            peaks.setdefault("GRPO 2 ranks FSDP2, server rollouts", []).append(max(found))
            peaks.setdefault("  + the lorakit serve process", []).append(served)
        print(f"model {params / 1e6:.0f}M-parameter Qwen3-shaped fp32 ({shape}, {layers} layers, {size:,.0f} MiB of "
              f"safetensors), gradient checkpointing {'on' if checkpointing else 'off'}, LoRA r=16 "
              f"all-linear, 1 step, batch 1, 128 tokens, {cores} CPU cores, torch {torch.__version__}")
        for label, values in peaks.items():
            print(f"{label:38s} largest peak RSS per rank MB {spread(values, '.0f')}")
        one = peaks["SFT 1 process"]
        for label in ("SFT 2 ranks DDP", "SFT 2 ranks FSDP2"):
            print(f"ratio {label} / 1 process (largest rank) {spread(ratios(peaks[label], one), '.2f')}")
        print(f"end: {load()}")


if __name__ == "__main__":
    main()

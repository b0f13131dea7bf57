"""Many adapters on one base: 4 SFT jobs trained together (`jobs:`) vs the same 4 jobs run one after another.

Same model, data, LoRA settings, batches and steps on both sides; each job keeps its own data, rank
and targets. Together: one `lorakit train` process with a `jobs:` config (the base loaded once, rows of
all jobs in each micro-batch, each routed to its adapter). Sequential: one process per job (the SFT
recipe with that job's settings alone), run one after another, as a user would today.

Jobs (demo model, fp32, CPU): identity (r 16, all-linear), medical (r 8, attention only), arith
(r 4, q/v), notes (r 32, MLP only, generated text); batch 2 each, no grad accumulation, --steps each.

Reported per repeat and as median [min..max] over --repeats (sides alternate, each process fresh):
wall time from process start to exit (imports, model load, data, training, saving), the training
loop alone, and peak RSS (together: its one process; sequential: the largest of the 4 processes).
Throughput ratio = sequential wall / together wall (same total tokens trained).

Then (``--step-repeats``, 0 to skip) the step alone, in one process: one mixed forward + backward of
the 4 jobs' micro-batches (as ``jobs:`` lays it out: every job's rows end to end in one row, each
token routed to its adapter) against the 4 jobs' own forward + backward (as the SFT recipe lays each
out), alternating, on the same micro-batches, in CPU time (a busy machine's waiting is not counted);
ratio = the 4 separate steps' time / the mixed step's.

    python benchmarks/multi_job.py [--steps 30] [--repeats 3] [--threads 1] [--step-repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def child(config: str, job: str) -> None:
    """Run one side in this (fresh) process and print its figures as JSON on the last line."""
    start = time.perf_counter()
    from lorakit.config import job_run_config, load_config

    cfg = load_config(config)
    lines: list[str] = []
    if job:
        from lorakit.recipes.sft import run

        spec = next(j for j in cfg.jobs if j.name == job)
        run(job_run_config(cfg, spec), log=lines.append)
        loop = next(float(l.split(" in ")[1].split("s")[0]) for l in lines if l.startswith("Trained "))
    else:
        from lorakit.recipes.multi_sft import run

        run(cfg, log=lines.append)
        loop = next(float(l.split(" in ")[1].split("s")[0]) for l in lines if l.startswith("Trained "))
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "loop_s": loop, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def write_config(work: Path, steps: int) -> Path:
    notes = work / "notes.jsonl"
    words = ("adapters share one frozen base while each job keeps its own optimizer schedule data and "
             "checkpoints so many small tasks train together on one machine").split()
    with open(notes, "w") as handle:
        for i in range(64):
            text = " ".join(words[(i + k) % len(words)] for k in range(8 + i % 24))
            handle.write(json.dumps({"text": text}) + "\n")
    from lorakit.models import ensure_demo_model

    ensure_demo_model()  # built once, before anything is timed
    body = {
        "model": "demo", "output_dir": str(work / "out"),
        "lora": {"alpha": 16, "dropout": 0.0},
        "train": {"max_steps": steps, "batch_size": 2, "lr": 1e-3, "max_seq_len": 128, "warmup_ratio": 0.0,
                  "logging_steps": 5, "seed": 1},
        "jobs": [
            {"name": "identity", "data": {"train": str(DATA / "identity.jsonl")},
             "lora": {"r": 16, "target_modules": "all-linear"}},
            {"name": "medical", "data": {"train": str(DATA / "medical.jsonl")},
             "lora": {"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
            {"name": "arith", "data": {"train": str(DATA / "arith_sft.jsonl")},
             "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
            {"name": "notes", "data": {"train": str(notes)},
             "lora": {"r": 32, "target_modules": ["gate_proj", "up_proj", "down_proj"]}},
        ],
    }
    path = work / "jobs.yaml"
    path.write_text(json.dumps(body))
    return path


def side(config: Path, job: str, out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, __file__, "--child", str(config), "--job", job, f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}..{max(values):.2f}]"


def step_compare(config: Path, repeats: int, batches: int = 8) -> list[tuple[float, float]]:
    """(mixed step s, 4 separate steps s) per repeat, each over the same ``batches`` micro-batches."""
    import torch

    from lorakit.config import job_run_config, load_config
    from lorakit.data import collate, pad_token_id
    from lorakit.lora import inject_lora, route_adapters, set_active_adapters
    from lorakit.models import load_model, load_tokenizer, resolve_model
    from lorakit.models.packed_attention import register_packed_sdpa
    from lorakit.training.jobs import mixed_batch, next_window, train_only
    from lorakit.training.loss import causal_lm_loss, causal_lm_loss_by_group
    from lorakit.training.rows import load_rows

    cfg = load_config(str(config))
    path = resolve_model(cfg.model)
    tokenizer, model = load_tokenizer(path), load_model(path, attn_implementation="sdpa")
    pad = pad_token_id(tokenizer)
    jobs = []
    for spec in cfg.jobs:
        job = job_run_config(cfg, spec)
        torch.manual_seed(job.train.seed)
        inject_lora(model, job.lora.to_lora_config(task_type="CAUSAL_LM"), adapter_name=spec.name)
        jobs.append((spec.name, load_rows(job.data.train, job.data, job.train, tokenizer, spec.name, lambda _: None),
                     job.train.batch_size))
    names = [name for name, _, _ in jobs]
    train_only(model, names)
    model.train()
    windows = [[next_window(rows, {"epoch": 0, "sample": k * size}, cfg.train.seed, size, 1)[0] for _, rows, size in jobs]
               for k in range(batches)]

    def mixed() -> None:  # as multi_sft runs it on this machine: one row, packed sdpa, per-token routes
        model.set_attn_implementation(register_packed_sdpa())
        for groups in windows:
            batch = mixed_batch(groups, pad, packed=True, concat=True, fill_empty=False, one_row=True)
            with route_adapters(model, [names[g] for g in batch["row_group"].flatten().tolist()]):
                sums, _ = causal_lm_loss_by_group(model, batch, batch["row_group"], len(jobs))
                sums.sum().backward()
        model.zero_grad(set_to_none=True)

    def separate() -> None:  # as the SFT recipe runs each job here: padded rows (sdpa is not varlen)
        model.set_attn_implementation("sdpa")
        for groups in windows:
            for name, rows in zip(names, groups):
                set_active_adapters(model, [name])
                loss, _ = causal_lm_loss(model, collate(rows, pad, packed=False))
                loss.backward()
        set_active_adapters(model, names)
        model.zero_grad(set_to_none=True)

    mixed(), separate()  # warm-up
    out = []
    for _ in range(repeats):  # CPU time of this process: time spent waiting for a busy machine's cores is not counted
        t0 = time.process_time()
        mixed()
        t1 = time.process_time()
        separate()
        out.append((t1 - t0, time.process_time() - t1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per job")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every training process")
    parser.add_argument("--step-repeats", type=int, default=5, help="repeats of the in-process step comparison (0: skip)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--job", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child_steps:
        print(json.dumps(step_compare(Path(args.child_steps), args.step_repeats)))
        return
    if args.child:
        from lorakit.config import load_config

        # the parent passes output_dir=...; rewrite the config with it
        cfg_path = Path(args.child)
        body = json.loads(cfg_path.read_text())
        for item in overrides:
            key, _, value = item.partition("=")
            body[key] = value
        cfg_path = cfg_path.with_name(f"run-{os.getpid()}.yaml")
        cfg_path.write_text(json.dumps(body))
        child(str(cfg_path), args.job)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = write_config(work, args.steps)
        jobs = [j["name"] for j in json.loads(config.read_text())["jobs"]]
        side(config, jobs[0], work / "warm", args.threads)  # writes the demo model; warms the file cache
        rows = []
        for repeat in range(args.repeats):
            together = side(config, "", work / f"together{repeat}", args.threads)
            alone = [side(config, job, work / f"alone{repeat}", args.threads) for job in jobs]
            rows.append({
                "together_wall": together["wall_s"], "together_loop": together["loop_s"],
                "together_rss": together["peak_rss_mb"],
                "seq_wall": sum(a["wall_s"] for a in alone), "seq_loop": sum(a["loop_s"] for a in alone),
                "seq_rss": max(a["peak_rss_mb"] for a in alone),
            })
            r = rows[-1]
            print(f"repeat {repeat + 1}: together {r['together_wall']:.1f}s (loop {r['together_loop']:.1f}s, "
                  f"{r['together_rss']:.0f} MB) | sequential {r['seq_wall']:.1f}s (loop {r['seq_loop']:.1f}s, "
                  f"peak {r['seq_rss']:.0f} MB)", flush=True)
        steps = []
        if args.step_repeats:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
            cmd = [sys.executable, __file__, "--child-steps", str(config), "--step-repeats", str(args.step_repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(proc.stdout + proc.stderr)
            steps = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{len(jobs)} jobs x {args.steps} steps, batch 2 each, demo model, fp32 CPU, "
          f"OMP_NUM_THREADS={args.threads}; median [min..max] of {args.repeats}")
    print(f"wall time     together {summary([r['together_wall'] for r in rows])} s, "
          f"sequential {summary([r['seq_wall'] for r in rows])} s, "
          f"throughput ratio {summary([r['seq_wall'] / r['together_wall'] for r in rows])}x")
    print(f"loop time     together {summary([r['together_loop'] for r in rows])} s, "
          f"sequential {summary([r['seq_loop'] for r in rows])} s, "
          f"ratio {summary([r['seq_loop'] / r['together_loop'] for r in rows])}x")
    print(f"peak RSS      together {summary([r['together_rss'] for r in rows])} MB, "
          f"one sequential run {summary([r['seq_rss'] for r in rows])} MB, "
          f"ratio {summary([r['together_rss'] / r['seq_rss'] for r in rows])}x")
    if steps:
        print(f"step alone    mixed {summary([m for m, _ in steps])} s, 4 separate {summary([a for _, a in steps])} s "
              f"(CPU time of 8 micro-batches each, forward + backward, one process, alternating; median [min..max] of "
              f"{len(steps)}), ratio {summary([a / m for m, a in steps])}x")


if __name__ == "__main__":
    main()

"""Several adapters trained at once on one base (`jobs:`): each job ends with the adapter it would get
trained alone (the SFT recipe is the oracle), jobs end at different steps, --resume after SIGKILL
continues every unfinished job exactly, and bad data or a bad job key stops the run before training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import ConfigError, job_run_config, load_config
from lorakit.recipes import multi_sft, sft

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = ROOT / "examples" / "data" / "identity.jsonl"
ARITH = ROOT / "examples" / "data" / "arith_sft.jsonl"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from lorakit.models import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    # text format: every token is labelled, so a job's samples put end to end count one more
    # target than when padded; the job's normaliser must follow the layout the loss sees
    path = tmp_path_factory.mktemp("data") / "notes.jsonl"
    lines = [f"Note {i}: the adapter for task {i % 3} keeps its own optimizer and schedule." for i in range(11)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def _jobs_config(tmp_path, demo, text_data, out="run", identity_steps=5, arith_steps=3, notes_epochs=2, save=None):
    """Three jobs with different ranks, targets, batches, schedules, seeds and lengths."""
    save = save or {}
    body = {
        "model": str(demo), "output_dir": str(tmp_path / out),
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"batch_size": 4, "lr": 2e-3, "max_seq_len": 128, "seed": 7, "warmup_ratio": 0.0},
        "jobs": [
            {"name": "identity", "data": {"train": str(IDENTITY), "eval": str(IDENTITY)},
             "train": {"max_steps": identity_steps, "grad_accum": 2, "save_steps": save.get("identity", 0)}},
            {"name": "arith", "data": {"train": str(ARITH)},
             "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
             "train": {"max_steps": arith_steps, "batch_size": 3, "seed": 11, "lr_scheduler": "constant", "lr": 1e-3,
                       "save_steps": save.get("arith", 0)}},
            {"name": "notes", "data": {"train": str(text_data)},
             "lora": {"r": 2, "target_modules": ["gate_proj", "down_proj"], "use_rslora": True},
             "train": {"epochs": notes_epochs, "batch_size": 2, "seed": 5, "warmup_ratio": 0.2, "save_steps": save.get("notes", 0)}},
        ],
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def _adapter(path):
    return load_file(Path(path) / "adapter" / "adapter_model.safetensors")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _metrics(path):
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def test_each_job_gets_the_adapter_it_gets_trained_alone(tmp_path, demo, text_data):
    cfg = load_config(_jobs_config(tmp_path, demo, text_data))
    lines = []
    adapters = multi_sft.run(cfg, log=lines.append)
    log = "\n".join(lines)
    assert sorted(adapters) == ["arith", "identity", "notes"]
    assert log.count("Applying 3 LoRA adapters") == 1  # one base for every job
    # the notes job (11 rows, batch 2, 2 epochs) runs 12 steps: the others end first
    assert "[notes] 12 steps" in log
    finished = [line.split("]")[0][1:] for line in lines if "adapter saved to" in line]
    assert finished == ["arith", "identity", "notes"]
    for job in cfg.jobs:
        alone = job_run_config(cfg, job)
        alone.output_dir = str(tmp_path / "alone" / job.name)
        sft.run(alone, log=lambda _: None)
        together, reference = _adapter(tmp_path / "run" / job.name), _adapter(alone.output_dir)
        assert _max_diff(together, reference) <= 1e-5, job.name
        assert any(v.abs().max() > 0 for k, v in together.items() if "lora_B" in k), job.name  # it trained
        ours, theirs = _metrics(tmp_path / "run" / job.name), _metrics(alone.output_dir)
        loss = {r["step"]: r["loss"] for r in ours if "loss" in r}
        ref_loss = {r["step"]: r["loss"] for r in theirs if "loss" in r}
        assert sorted(loss) == sorted(ref_loss) == list(range(1, len(ref_loss) + 1))
        assert all(abs(loss[s] - ref_loss[s]) <= 1e-5 for s in loss), job.name
        for key in ("eval_loss", "tokens"):
            assert [r[key] for r in ours if key in r] == pytest.approx([r[key] for r in theirs if key in r], abs=1e-5)
        # the adapter config is the job's own (rank, targets), readable by the single-run tools
        config = json.loads((tmp_path / "run" / job.name / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == job.lora.r
    # each job's checkpoint records the job's config as a single run: it resumes with `lorakit train` alone
    saved = load_config(tmp_path / "run" / "arith" / "checkpoint-3" / "config.yaml")
    assert not saved.jobs and saved.lora.r == 4 and saved.output_dir == str(tmp_path / "run" / "arith")


def _train(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_resume_after_sigkill_continues_every_unfinished_job(tmp_path, demo, text_data):
    save = {"identity": 4, "arith": 3, "notes": 5}
    # arith ends at step 6, notes at 24 (4 epochs), identity at 16 (32 micro-batches); killed at
    # identity's step 8 (micro-batch 16), arith is done, the others resume from steps 8 and 15
    cfg = _jobs_config(tmp_path, demo, text_data, identity_steps=16, arith_steps=6, notes_epochs=4, save=save)
    multi_sft.run(load_config(cfg, [f"output_dir={tmp_path / 'ref'}"]), log=lambda _: None)

    victim = _train([str(cfg)])
    out = tmp_path / "run"
    deadline = time.time() + 300
    while not (out / "identity" / "checkpoint-8").exists():
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (out / "identity" / "adapter").exists(), "the run finished before it could be killed"
    assert (out / "arith" / "adapter").is_dir()  # 6 steps: finished and saved before the kill
    assert not (out / "notes" / "adapter").exists()

    resumed = _train([str(cfg), "--resume"])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"[identity] resumed from {out / 'identity'}" in output and "[notes] resumed from" in output
    assert f"[arith] finished earlier: {out / 'arith' / 'adapter'}" in output
    assert sum("train_runtime" in r for r in _metrics(out / "arith")) == 1  # nothing redone or rewritten
    for job in ("identity", "arith", "notes"):
        assert _max_diff(_adapter(out / job), _adapter(tmp_path / "ref" / job)) <= 1e-6, job
        steps = [r["step"] for r in _metrics(out / job) if "loss" in r]
        assert steps == [r["step"] for r in _metrics(tmp_path / "ref" / job) if "loss" in r], job


def test_bad_data_in_one_job_stops_the_run_before_training(tmp_path, demo, text_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(IDENTITY.read_text().splitlines()[0] + "\n" + '{"conversations": [}\n')
    cfg = _jobs_config(tmp_path, demo, text_data)
    body = json.loads(cfg.read_text())
    body["jobs"][1]["data"]["train"] = str(bad)
    cfg.write_text(json.dumps(body))
    proc = _train([str(cfg)])
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, output
    assert f"error: job 'arith': {bad}:2: invalid JSON" in output and "Traceback" not in output
    assert not list((tmp_path / "run").rglob("metrics.jsonl")) and not list((tmp_path / "run").rglob("checkpoint-*"))


def test_job_keys_inherit_and_mistakes_name_file_line_and_job(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text("model: m\nlora:\n  r: 4\ntrain:\n  lr: 1.0e-3\njobs:\n  - name: a\n    data: {train: a.jsonl}\n"
                    "  - name: b\n    data:\n      train: b.jsonl\n    lora:\n      r: 8\n    train:\n      max_steps: 3\n")
    cfg = load_config(path)
    a, b = cfg.jobs
    assert (a.lora.r, b.lora.r, a.train.lr, b.train.lr, b.train.max_steps) == (4, 8, 1e-3, 1e-3, 3)
    alone = job_run_config(cfg, b)
    assert alone.output_dir == str(Path("out/run") / "b") and alone.lora.r == 8 and not alone.jobs
    # what a run records reads back to the same config
    from lorakit.config import dump_config

    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg
    for line, bad, message in [
        (15, "      lrr: 1", r"jobs.yaml:15 \(job 'b'\): unknown key 'train.lrr' for a job \(did you mean 'train.lr'\?\)"),
        (15, "      dtype: bf16", r"jobs.yaml:15 \(job 'b'\): 'train.dtype' is shared by all jobs; set it at the top level"),
        (15, "      batch_size: 0", r"jobs.yaml:15 \(job 'b'\): 'train.batch_size' must be > 0"),
        (9, "  - name: a", r"jobs.yaml:9: job name 'a' is used twice \(first at .*jobs.yaml:7\)"),
    ]:
        text = path.read_text().splitlines()
        text[line - 1] = bad
        path.write_text("\n".join(text) + "\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)
        path.write_text("model: m\nlora:\n  r: 4\ntrain:\n  lr: 1.0e-3\njobs:\n  - name: a\n    data: {train: a.jsonl}\n"
                        "  - name: b\n    data:\n      train: b.jsonl\n    lora:\n      r: 8\n    train:\n      max_steps: 3\n")


def _launch_torchrun(cfg, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lorakit",
           "train", str(cfg), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process(tmp_path, demo, text_data, mode):
    def config(name, per_rank):
        body = {
            "model": str(demo), "output_dir": str(tmp_path / name),
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "train": {"lr": 2e-4, "max_seq_len": 128, "seed": 3, "warmup_ratio": 0.0},
            "jobs": [
                {"name": "identity", "data": {"train": str(IDENTITY)},
                 "train": {"max_steps": 3, "grad_accum": 2, "batch_size": 2 * per_rank}},
                {"name": "arith", "data": {"train": str(ARITH)}, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                 "train": {"max_steps": 2, "batch_size": per_rank, "seed": 11}},
                # 11 rows in global batches of 2: the last one leaves a rank without a row
                {"name": "notes", "data": {"train": str(text_data)}, "lora": {"r": 2, "target_modules": ["down_proj"]},
                 "train": {"epochs": 1, "batch_size": per_rank}},
            ],
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(body))
        return path

    multi_sft.run(load_config(config("single", 2)), log=lambda _: None)
    log = _launch_torchrun(config(mode, 1), f"train.distributed={mode}")
    assert f"[identity] 3 steps" in log and "global batch 8 = batch 2 x 2 rank(s) x grad_accum 2" in log
    for job in ("identity", "arith", "notes"):
        single, dist = _metrics(tmp_path / "single" / job), _metrics(tmp_path / mode / job)
        ref = {r["step"]: r["loss"] for r in single if "loss" in r}
        got = {r["step"]: r["loss"] for r in dist if "loss" in r}
        assert sorted(ref) == sorted(got) and all(abs(ref[s] - got[s]) <= 1e-4 for s in ref), (job, ref, got)
        assert _max_diff(_adapter(tmp_path / "single" / job), _adapter(tmp_path / mode / job)) <= 1e-5, job


def test_route_adapters_takes_one_adapter_per_token():
    """Per-token routing (several jobs' samples in one row) equals running each token's adapter alone,
    forward and backward; a gradient reaches only the adapter of the tokens it came from."""
    from lorakit import LoraConfig, inject_lora, set_active_adapters
    from lorakit.lora import route_adapters

    from .models import randomize_lora, tiny_qwen3

    model = tiny_qwen3(seed=1)
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"), adapter_name="a")
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), adapter_name="b")
    randomize_lora(model, scale=0.3)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    names = ["a", "a", "b", None, "b", "b", "a", "a", "a", "b"]  # (2 x 5) tokens, row-major
    out = layer.out_features
    expected = torch.empty(2, 5, out)
    with torch.no_grad():
        for i, name in enumerate(names):
            set_active_adapters(model, [name] if name else [])
            expected.view(10, out)[i] = layer(x.view(10, 1, 32)[i:i + 1])[0, 0]
    with route_adapters(model, names):
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for p in layer.parameters():
        p.requires_grad_("lora_" in str([n for n, q in layer.named_parameters() if q is p]))
    with route_adapters(model, ["b"] * 5 + [None] * 5):  # row 0 all 'b', row 1 the base
        layer(x)[1].sum().backward()  # a loss on the base's tokens only
    assert layer.lora_A["a"].weight.grad is None and not layer.lora_A["b"].weight.grad.any()
    with route_adapters(model, ["b"] * 5 + [None] * 5):
        layer(x)[0].sum().backward()
    assert layer.lora_A["a"].weight.grad is None and layer.lora_A["b"].weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="7 row adapters but the batch has 2 rows \\(10 tokens\\)"):
        with route_adapters(model, ["a"] * 7):
            layer(x)


@pytest.mark.parametrize("owner", [[0] * 4 + [2] * 6 + [1] * 5, [0] * 4 + [2] * 3 + [0] * 3 + [1] * 5])
def test_loss_by_group_of_one_row_matches_each_group_by_hand(owner):
    """One row holding several groups' tokens (blocks, or a group split in two): each group's summed
    loss and its gradient are the hand-computed cross-entropy of that group's targets; a group with
    no token (3) sums to zero."""
    import torch.nn.functional as F

    from lorakit.training.loss import causal_lm_loss_by_group

    from .models import tiny_qwen3

    model = tiny_qwen3(seed=5).train()
    ids = torch.randint(0, 128, (1, 15), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, [0, 4, 5, 10]] = -100  # each group's first token and a prompt token
    groups = torch.tensor([owner])
    sums, counts = causal_lm_loss_by_group(model, {"input_ids": ids, "labels": labels}, groups, 4)
    sums.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits[0, :-1]
    per_token = F.cross_entropy(logits, labels[0, 1:], reduction="none", ignore_index=-100)
    target_group = groups[0, 1:]
    expected = torch.stack([per_token[target_group == g].sum() for g in range(4)])
    torch.testing.assert_close(sums, expected.detach(), atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [int(((target_group == g) & (labels[0, 1:] != -100)).sum()) for g in range(4)]
    assert sums[3] == 0
    expected.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)

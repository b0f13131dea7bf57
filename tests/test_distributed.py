"""SFT on real torchrun processes (CPU, gloo, 2 ranks): DDP and FSDP2 match one process, resume
across world sizes, and a dead rank ends the job instead of hanging it."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "identity.jsonl"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from lorakit.models import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


def _config(tmp_path, demo, name="cfg.yaml", **train):
    body = {"model": str(demo), "output_dir": str(tmp_path / "run"), "data": {"train": str(DATA)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "train": {"max_steps": 4, "batch_size": 2, "lr": 2e-3, "max_seq_len": 128, "seed": 3, "warmup_ratio": 0.0,
                      **train}}
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return path


def _launch(cfg, nproc, *overrides, **popen):
    cmd = [sys.executable, "-m", "lorakit", "train", str(cfg), *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lorakit", "train", str(cfg), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


def _run(cfg, nproc, *overrides):
    proc = _launch(cfg, nproc, *overrides)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    return out


def _losses(out_dir):
    lines = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _adapter(out_dir):
    return load_file(Path(out_dir) / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2+gc"])
def test_two_ranks_match_one_process(tmp_path, demo, mode):
    # lr as typical for LoRA; Adam turns float-rounding noise in near-zero gradients into steps of size
    # ~lr, so the adapter tolerance scales with it
    cfg = _config(tmp_path, demo, grad_accum=2, lr=2e-4, gradient_checkpointing=mode.endswith("+gc"))
    _run(cfg, 1, f"output_dir={tmp_path / 'single'}", "train.batch_size=4")
    log = _run(cfg, 2, f"output_dir={tmp_path / mode}", f"train.distributed={mode.split('+')[0]}")
    assert "global batch 8 = batch 2 x 2 rank(s) x grad_accum 2" in log
    single, dist = _losses(tmp_path / "single"), _losses(tmp_path / mode)
    assert sorted(single) == sorted(dist) == [1, 2, 3, 4]
    for step in single:
        assert abs(single[step] - dist[step]) <= 1e-4, (step, single[step], dist[step])
    ref, got = _adapter(tmp_path / "single"), _adapter(tmp_path / mode)
    assert ref.keys() == got.keys()
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5


def test_fsdp2_checkpoint_resumes_on_one_and_two_ranks(tmp_path, demo):
    cfg = _config(tmp_path, demo, max_steps=6, save_steps=3)
    _run(cfg, 2, f"output_dir={tmp_path / 'ref'}", "train.distributed=fsdp2")
    reference = _losses(tmp_path / "ref")
    for nproc, extra in ((2, ["train.distributed=fsdp2"]), (1, ["train.batch_size=4"])):
        out = tmp_path / f"resume{nproc}"
        out.mkdir()
        shutil.copytree(tmp_path / "ref" / "checkpoint-3", out / "checkpoint-3")
        log = _run(cfg, nproc, f"output_dir={out}", *extra, "--resume")
        assert "Resumed from" in log and "step 3" in log
        resumed = _losses(out)
        for step in (4, 5, 6):
            assert abs(resumed[step] - reference[step]) <= 1e-4, (nproc, step, resumed[step], reference[step])


def test_a_killed_rank_ends_the_job_quickly(tmp_path, demo):
    cfg = _config(tmp_path, demo, max_steps=100000, save_steps=1)
    proc = _launch(cfg, 2, f"output_dir={tmp_path / 'run'}", "train.distributed=ddp", start_new_session=True)
    deadline = time.time() + 180
    while not (tmp_path / "run" / "checkpoint-1").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    killed = time.time()
    os.kill(int(workers[-1]), signal.SIGKILL)
    try:
        output = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the job did not end within 60 s of a rank dying")
    assert proc.returncode != 0
    assert time.time() - killed < 60
    assert "Signal 9" in output or "SIGKILL" in output or "exitcode" in output


def _read_per_rank(log):
    """The sharded-load report: MiB each rank read from the checkpoint, and the largest single read."""
    match = re.search(r"MiB read per rank \[([0-9., ]+)\] of the [0-9.,]+ MiB checkpoint; largest single read ([0-9.]+)", log)
    assert match, log
    return [float(x.replace(",", "")) for x in match.group(1).split(",")], float(match.group(2))


def test_sharded_load_hsdp_and_cpu_offload_match_one_process(tmp_path, demo):
    """FSDP2 builds the base on meta and each rank reads only its slices of the checkpoint; plain
    FSDP2 with cpu_offload (2 ranks) and HSDP (2 replica groups x 2 ranks) train as one process."""
    cfg = _config(tmp_path, demo, grad_accum=2, lr=2e-4)
    _run(cfg, 1, f"output_dir={tmp_path / 'single'}", "train.batch_size=4")
    offload = _run(cfg, 2, f"output_dir={tmp_path / 'offload'}", "train.distributed=fsdp2", "train.cpu_offload=true")
    hsdp = _run(cfg, 4, f"output_dir={tmp_path / 'hsdp'}", "train.distributed=fsdp2", "train.fsdp_replicate=2",
                "train.batch_size=1")
    assert "HSDP: 2 replica groups x 2 ranks" in hsdp
    assert "train.cpu_offload on a CPU run" in offload

    # The oracle: the checkpoint's tensors, counted here from the file.
    whole = sum(t.numel() * t.element_size() for t in load_file(demo / "model.safetensors").values()) / 2 ** 20
    for log, nproc, copies in ((offload, 2, 1), (hsdp, 4, 2)):
        per_rank, largest = _read_per_rank(log)
        assert len(per_rank) == nproc
        assert max(per_rank) <= 0.55 * whole, (per_rank, whole)  # its own half, never the whole base
        assert abs(sum(per_rank) - copies * whole) <= 0.01 * whole + 0.1 * nproc  # every byte read once per group
        assert largest <= 0.1 * whole  # the buffer: one slice of one tensor

    single = _losses(tmp_path / "single")
    ref = _adapter(tmp_path / "single")
    for run in ("offload", "hsdp"):
        dist = _losses(tmp_path / run)
        assert sorted(dist) == sorted(single) == [1, 2, 3, 4]
        for step in single:
            assert abs(single[step] - dist[step]) <= 1e-4, (run, step, single[step], dist[step])
        got = _adapter(tmp_path / run)
        assert ref.keys() == got.keys()
        assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5, run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_offload_on_gpu_matches_no_offload(tmp_path, demo):
    cfg = _config(tmp_path, demo, grad_accum=2, lr=2e-4, dtype="fp32", device="cuda", distributed="fsdp2")
    _run(cfg, 1, f"output_dir={tmp_path / 'plain'}")
    _run(cfg, 1, f"output_dir={tmp_path / 'offload'}", "train.cpu_offload=true")
    plain, offload = _losses(tmp_path / "plain"), _losses(tmp_path / "offload")
    for step in plain:
        assert abs(plain[step] - offload[step]) <= 1e-4, (step, plain[step], offload[step])
    ref, got = _adapter(tmp_path / "plain"), _adapter(tmp_path / "offload")
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5


def test_fsdp2_loads_a_per_expert_moe_checkpoint_sharded_and_matches_one_process(tmp_path):
    # transformers saves MoE experts one by one (the hub layout) and fuses them while loading; the
    # sharded load reads each rank's experts from those tensors instead of falling back to a whole
    # base on every rank. LoRA on attention and on every expert (all-linear).
    from lorakit.models import write_demo_model

    from transformers import AutoModelForCausalLM

    fused = write_demo_model(tmp_path / "demo-moe", moe=True)  # lorakit writes the fused layout
    moe = tmp_path / "hub-moe"
    loaded = AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(loaded.config)  # built, not loaded: saved in the hub layout
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(moe)
    for extra in fused.iterdir():
        if not (moe / extra.name).exists():
            shutil.copy(extra, moe / extra.name)  # tokenizer, chat template
    assert any(".experts.0." in k for k in load_file(moe / "model.safetensors"))
    cfg = _config(tmp_path, moe, grad_accum=1, lr=2e-4, max_steps=2)
    _run(cfg, 1, f"output_dir={tmp_path / 'single'}", "train.batch_size=4")
    log = _run(cfg, 2, f"output_dir={tmp_path / 'fsdp2'}", "train.distributed=fsdp2")
    assert "FSDP2 loads the whole base" not in log, log
    whole = sum(t.numel() * t.element_size() for t in load_file(moe / "model.safetensors").values()) / 2 ** 20
    per_rank, _ = _read_per_rank(log)
    assert max(per_rank) <= 0.6 * whole and abs(sum(per_rank) - whole) <= 0.01 * whole + 0.2, (per_rank, whole)
    single, dist = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp2")
    assert sorted(single) == sorted(dist) == [1, 2]
    for step in single:
        assert abs(single[step] - dist[step]) <= 1e-4, (step, single[step], dist[step])
    ref, got = _adapter(tmp_path / "single"), _adapter(tmp_path / "fsdp2")
    assert ref.keys() == got.keys() and any("experts" in k for k in ref)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5

"""SFT on real torchrun processes (CPU, gloo, 2 ranks): DDP and FSDP2 match one process, resume
across world sizes, and a dead rank ends the job instead of hanging it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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

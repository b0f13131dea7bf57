"""What a GRPO sync and a checkpoint cost each rank in communication (real torchrun, 2 ranks, FSDP2, gloo).

An all-gather puts the whole adapter (or the whole optimizer state) on every rank, so its cost per
rank stays the whole at any world size. The sampler of an engine that reads the policy's own
weights gathers nothing; a server's adapter and a checkpoint's tensors go to rank 0 only. The
oracle for the bytes is every collective the worker dispatches, counted by a dispatch mode.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit
from lorakit.models import write_demo_model

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sync_bytes_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_bytes")
    demo = write_demo_model(tmp_path_factory.mktemp("models") / "demo")  # its tokenizer, for the local engine
    src = str(Path(lorakit.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           "--out", str(out), "--tokenizer", str(demo)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    written = sorted(p.name for p in out.glob("result_*.json"))
    assert proc.returncode == 0, f"results written: {written}\n" + proc.stdout[-4000:] + proc.stderr[-4000:]
    found = [json.loads((out / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]
    for data in found:
        assert "error" not in data, data["error"]
    return found


def test_syncing_an_engine_on_the_policys_own_weights_gathers_nothing(results):
    for r in results:
        # per-rank digests (a few dozen bytes) and the barrier, not the adapter
        assert r["sync_local_bytes"] < 0.01 * r["adapter_bytes"], r
    # An engine on the policy's own weights is checked against each rank's adapter_stamp of its own
    # tensors (what LocalRollout.held reports): per rank, never gathered, so ranks need not agree.
    assert all(r["fingerprints"][0].startswith("stamp-") for r in results)
    assert results[0]["fingerprints"][1] == results[1]["fingerprints"][1]  # every rank agrees on the server's adapter


def test_a_servers_adapter_is_assembled_on_the_main_rank_only(results):
    main, other = results
    assert main["server_tensor_bytes"] == main["adapter_bytes"] and other["server_tensor_bytes"] == 0
    assert other["sync_server_bytes"] < 0.01 * other["adapter_bytes"], other  # sends its shards, receives none


def test_a_checkpoint_is_gathered_to_rank_0_only_and_resumes_exactly(results):
    main, other = results
    state = 3 * main["adapter_bytes"]  # the adapter and AdamW's two moments
    assert main["checkpoint_bytes"] >= 0.5 * state  # rank 0 receives the other rank's shards
    assert other["checkpoint_bytes"] < 0.02 * state, other  # the other rank receives none of it
    assert main["optimizer_resumed_exactly"] and other["optimizer_resumed_exactly"]

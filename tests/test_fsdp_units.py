"""FSDP2 shards the embedding and the head as units of their own (real torchrun, 2 ranks, gloo).

Left in the root group, they stayed gathered whole from the start of the forward to the end of the
backward on every rank: on a 150k vocabulary, the largest block of a small model. The oracle for
the numbers is the same model run whole in the worker process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fsdp_units_worker.py"
CASES = ["untied", "tied", "untied_uneven", "tied_uneven", "untied_long", "tied_long"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_units")
    src = str(Path(lorakit.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    written = sorted(p.name for p in out.glob("results_*.json"))
    assert proc.returncode == 0, f"results written: {written}\n" + proc.stdout[-4000:] + proc.stderr[-4000:]
    found = {}
    for tie in CASES:
        for rank in (0, 1):
            data = json.loads((out / f"results_{tie}_rank{rank}.json").read_text())
            assert "error" not in data, data["error"]
            found[tie, rank] = data
    return found


@pytest.mark.parametrize("tie", CASES)
def test_loss_grads_and_logprobs_match_the_whole_model(results, tie):
    for rank in (0, 1):
        r = results[tie, rank]
        assert r["loss_diff"] <= 1e-5, r
        assert r["grad_names_match"] and r["lora_grads"] > 0
        assert r["grad_diff"] <= 1e-5, r
        assert r["logprobs"] > 0 or (tie.endswith("uneven") and rank == 1)
        assert r["logprob_diff"] <= 1e-5, r
        # few rows: the ranks exchange hidden rows; many (2 x 114 rows vs a 96-token vocabulary):
        # the head is gathered instead (the loss and the log-probs: at least one call each)
        if tie.endswith("long"):
            assert r["head_gathers"] >= 1 and r["row_exchanges"] == 0, r
        else:
            assert r["row_exchanges"] >= 1 and r["head_gathers"] == 0, r


@pytest.mark.parametrize("tie", CASES)
def test_embedding_and_head_stay_sharded_outside_their_use(results, tie):
    for rank in (0, 1):
        r = results[tie, rank]
        # in the blocks' forward (a tied unit is freed after the lookup, though the head never ran),
        # between forward and backward, and while the backward runs from the last block to the first
        assert r["lookup_in_shards"]  # the vocabulary is never gathered for a lookup
        assert r["in_forward"] and r["after_forward"] and r["in_backward_last"] and r["in_backward_first"] and r["after_backward"], r

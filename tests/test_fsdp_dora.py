"""DoRA under FSDP2 (real torchrun, 2 ranks, gloo): the base's row norms are read once, not per micro-batch.

FSDP2 gathers each block's weights into storage it frees after use, so the gathered base weight
changes address on most micro-batches (its version stays 0: an address the allocator hands out
again looks unchanged); a cache keyed on (data_ptr, _version) re-read every adapted base weight
in fp32 on most steps. Keyed on the layer's generation, it is read once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lorakit

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fsdp_dora_worker.py"


def test_dora_base_norms_are_read_once_under_fsdp2(tmp_path):
    src = str(Path(lorakit.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"results_rank{rank}.json").read_text())
        assert "error" not in r, r["error"]
        # the scenario is real: the forwards saw the gathered weight at different addresses
        assert len(r["seen"]) == 6 and len({s[0] for s in r["seen"]}) > 1, r["seen"]
        assert r["after_first"] <= 2 * r["layers"], r  # at injection, at most once more when sharded
        assert r["end"] == r["after_first"], r  # no micro-batch after the first read a base weight again

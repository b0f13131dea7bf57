"""scripts/gpu_lane.sh --dry-run: the GPU lane's every stage runs end to end on CPU with tiny shapes,
and the lane's JSON carries a status and figures for each, so the script is known to work before a
device ever sees it. A stage that fails (here: one that runs out of time) is recorded and the stages
after it still run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LANE = ROOT / "scripts" / "gpu_lane.sh"
STAGES = ["setup", "pytest", "sft", "engine", "grpo"]


def _lane(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_LANE_WHEELS": str(out / "no-wheels"),
           "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(LANE), "--dry-run", *args], capture_output=True, text=True, env=env, timeout=900)
    lane = json.loads((out / "gpu_lane.json").read_text()) if (out / "gpu_lane.json").is_file() else {}
    return proc, lane


def _tiny_flops_per_token() -> int:
    """By hand from the "tiny" shape (hidden 64, 2 layers, 4 query heads and 2 KV heads of 16,
    MLP 128, vocab 512, untied head), LoRA r=16 on every linear layer but the head."""
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]  # (in, out): q k v o gate up down
    matmul = 2 * sum(i * o for i, o in shapes) + 64 * 512
    lora = 2 * sum(16 * (i + o) for i, o in shapes)
    return 4 * matmul + 6 * lora


def test_dry_run_runs_every_stage_and_reports_figures(tmp_path):
    proc, lane = _lane(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lane["dry_run"] is True and list(lane["stages"]) == STAGES
    for name, stage in lane["stages"].items():
        log = (tmp_path / stage["log"]).read_text()
        assert stage["status"] == "ok", (name, stage["reason"], log[-2000:])
        assert stage["figures"], name

    setup = lane["stages"]["setup"]["figures"]
    assert setup["packages"]["torch"] == torch.__version__
    # no wheel folder here: each wheel the lane would install says so, one line per package
    assert [line.split(":")[0] for line in setup["wheels"]] == ["pytest-timeout", "trl"]

    tests = lane["stages"]["pytest"]["figures"]
    names = {case["test"] for case in tests["cases"]}
    assert "tests.test_sft::test_padding_free_batches_train_like_padded_ones" in names
    assert "tests.rl.test_grpo_fp16::test_fp16_grpo_resumes_exactly" in names
    if not torch.cuda.is_available():  # every gpu test skips, saying why
        assert tests["tests"] == tests["skipped"] >= 5 and tests["passed"] == tests["failures"] == 0
        assert all(case["outcome"] == "skipped" and case["message"] for case in tests["cases"])

    sft = lane["stages"]["sft"]["figures"]
    assert sft["model"]["flops_per_token"] == _tiny_flops_per_token()
    lorakit = sft["results"][0]["lorakit"]
    assert len(lorakit["tokens_per_s"]) == 1 and lorakit["tokens_per_s"][0] > 0 and lorakit["peak_mem_mb"][0] > 0
    assert lorakit["tokens"] == sft["tokens"]  # the run trained on every token of the data
    # MFU against the dry run's nominal 1 TFLOP/s peak
    assert abs(lorakit["mfu"][0] - lorakit["tokens_per_s"][0] * _tiny_flops_per_token() / 1e12) < 1e-12
    assert sft["peer"] == "none" and sft["peer_skipped"]

    engine = lane["stages"]["engine"]["figures"]
    assert [r["batch"] for r in engine["results"]] == [1, 4]
    for result in engine["results"]:
        assert set(result["tokens_per_s"]) == {"1 adapter", "8 adapters mixed", "merged (no LoRA)"}
        assert all(len(v) == 1 and v[0] > 0 for v in result["tokens_per_s"].values())

    grpo = lane["stages"]["grpo"]["figures"]
    assert [s["step"] for s in grpo["steps"]] == [1, 2] and grpo["rollouts_per_step"] == 4
    assert all(s["completion_len"] > 0 and s["rollout_tokens_per_s"] > 0 for s in grpo["steps"])
    assert len((tmp_path / "grpo_metrics.jsonl").read_text().splitlines()) >= 2


def test_a_stage_out_of_time_is_recorded_and_the_lane_goes_on(tmp_path):
    proc, lane = _lane(tmp_path, "--stages", "pytest,grpo", "--timeout", "pytest=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = lane["stages"]
    assert stages["pytest"]["status"] == "failed" and "timed out after 1s" in stages["pytest"]["reason"]
    assert stages["pytest"]["figures"] is None
    assert stages["grpo"]["status"] == "ok" and [s["step"] for s in stages["grpo"]["figures"]["steps"]] == [1, 2]
    for name in ("setup", "sft", "engine"):
        assert stages[name]["status"] == "skipped" and "not selected" in stages[name]["reason"]


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path):
    proc, lane = _lane(tmp_path, "--stages", "pytest,sftt")
    assert proc.returncode == 2 and "unknown stage 'sftt'" in proc.stderr
    assert lane == {}


def test_the_pytest_stage_reads_each_outcome_from_pytests_junit_report(tmp_path):
    """The figures of the pytest stage on a device, where tests pass, fail and skip: pytest's own
    JUnit XML of a real run is the oracle; an empty selection is an error, not a pass."""
    (tmp_path / "test_mix.py").write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2, 'one is not two'\n\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skip():\n    pass\n")
    (tmp_path / "test_none.py").write_text("X = 1\n")
    report = ROOT / "scripts" / "gpu_lane_report.py"
    for name in ("mix", "none"):
        subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir",
                        str(tmp_path), f"--junitxml={tmp_path / name}.xml", str(tmp_path / f"test_{name}.py")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    ok = subprocess.run([sys.executable, str(report), "junit", str(tmp_path / "mix.xml"), str(tmp_path / "mix.json")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    figures = json.loads((tmp_path / "mix.json").read_text())
    assert {k: figures[k] for k in ("tests", "passed", "failures", "skipped", "errors")} == {
        "tests": 3, "passed": 1, "failures": 1, "skipped": 1, "errors": 0}
    outcomes = {case["test"].split("::")[-1]: (case["outcome"], case["message"]) for case in figures["cases"]}
    assert outcomes["test_ok"] == ("passed", "") and outcomes["test_skip"] == ("skipped", "not here")
    assert outcomes["test_bad"][0] == "failed" and "one is not two" in outcomes["test_bad"][1]
    empty = subprocess.run([sys.executable, str(report), "junit", str(tmp_path / "none.xml"), str(tmp_path / "none.json")],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 1 and "collected nothing" in empty.stderr

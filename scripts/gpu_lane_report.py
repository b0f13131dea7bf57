"""The GPU lane's bookkeeping (scripts/gpu_lane.sh calls it; stdlib only, so it runs even where
torch does not import): the machine's description, the pytest stage's JUnit counts, the GRPO
stage's figures, and the lane's JSON assembled from the stages' status files.

    python scripts/gpu_lane_report.py setup OUT_JSON [WHEELS_LOG]
    python scripts/gpu_lane_report.py status OUT_DIR STAGE STATUS SECONDS REASON
    python scripts/gpu_lane_report.py junit JUNIT_XML OUT_JSON
    python scripts/gpu_lane_report.py grpo METRICS_JSONL PROMPTS_PER_STEP GENERATIONS OUT_JSON
    python scripts/gpu_lane_report.py assemble OUT_DIR STAGE [STAGE ...]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "accelerate", "triton", "pytest", "pytest-timeout", "trl", "datasets",
            "pyarrow", "pandas", "safetensors", "flash-attn", "vllm", "bitsandbytes", "megatron-core",
            "transformer-engine", "gguf")


def _write(path: str, obj) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def status(out_dir: str, stage: str, state: str, seconds: str, reason: str) -> None:
    """One stage's outcome, ``OUT_DIR/status/STAGE.json``."""
    folder = Path(out_dir) / "status"
    folder.mkdir(parents=True, exist_ok=True)
    _write(str(folder / f"{stage}.json"), {"status": state, "reason": reason, "seconds": round(float(seconds), 1),
                                           "log": f"logs/{stage}.log"})


def setup(out: str, wheels_log: str = "") -> None:
    """Versions of Python, the packages the lane uses, and the GPU as torch and nvidia-smi see it;
    what the offline wheel install did (one line per package, from ``wheels_log``)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {"python": platform.python_version(), "executable": sys.executable, "packages": versions}
    if wheels_log and Path(wheels_log).is_file():
        info["wheels"] = Path(wheels_log).read_text().splitlines()
    try:
        import torch

        info.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                    device_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    except Exception as exc:  # the lane must say why, not stop
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"not available: {exc}"
    _write(out, info)
    print(json.dumps(info, indent=1))


def junit(xml_path: str, out: str) -> None:
    """Counts and per-test outcomes from pytest's JUnit XML. Exits 1 when nothing was collected."""
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests = []
    for case in suite.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], node.get("message", "")
                break
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message.splitlines()[0][:300] if message else ""})
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    _write(out, {**counts, "seconds": float(suite.get("time") or 0), "cases": tests})
    print(json.dumps(counts))
    if counts["tests"] == 0:
        raise SystemExit("no test carries the gpu mark: pytest -m gpu collected nothing")


def grpo(metrics: str, prompts: str, generations: str, out: str) -> None:
    """Per-step figures of a GRPO run's metrics.jsonl (rollout tokens/s from the completion lengths)."""
    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    rows = int(prompts) * int(generations)
    steps = []
    for r in records:
        if "reward_mean" not in r:
            continue
        steps.append({key: r.get(key) for key in ("step", "loss", "reward_mean", "completion_len", "tokens_per_s",
                                                   "rollout_s", "step_s", "sync_s", "grad_norm")})
        steps[-1]["rollout_tokens_per_s"] = rows * r["completion_len"] / max(r["rollout_s"], 1e-9)
    runtime = next((r["train_runtime"] for r in records if "train_runtime" in r), None)
    _write(out, {"steps": steps, "train_runtime": runtime, "rollouts_per_step": rows})
    print(json.dumps(steps, indent=1))
    if not steps:
        raise SystemExit(f"{metrics}: no GRPO step was logged")


def assemble(out_dir: str, *stages: str) -> None:
    """``gpu_lane.json``: for each stage its status (ok / failed / skipped / pending), reason, seconds,
    log file and figures (its ``<stage>.json`` when it wrote one, even a partial one)."""
    out = Path(out_dir)
    lane = json.loads((out / "lane.json").read_text()) if (out / "lane.json").is_file() else {}
    lane["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lane["stages"] = {}
    for name in stages:
        status = out / "status" / f"{name}.json"
        entry = json.loads(status.read_text()) if status.is_file() else {"status": "pending", "reason": "not run yet"}
        figures = out / f"{name}.json"
        try:
            entry["figures"] = json.loads(figures.read_text()) if figures.is_file() else None
        except ValueError as exc:
            entry["figures"] = None
            entry["figures_error"] = f"{figures.name}: {exc}"
        lane["stages"][name] = entry
    _write(str(out / "gpu_lane.json"), lane)


if __name__ == "__main__":
    commands = {"status": status, "setup": setup, "junit": junit, "grpo": grpo, "assemble": assemble}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: {Path(__file__).name} {{{','.join(commands)}}} ...")
    commands[sys.argv[1]](*sys.argv[2:])

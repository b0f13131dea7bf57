#!/usr/bin/env bash
# The GPU lane (issue 28): one command that proves lorakit's GPU paths on one NVIDIA GPU in <= 8
# minutes, writes everything under $OUT and never stops at the first failure.
#
# How the lead fires it, when a device is lent (device time is ~15 min in all, starts included):
#   1. Here, with network, once per checkout (fills the gitignored .gpu_lane_wheels/, ~2 MB):
#        scripts/gpu_lane_wheels.sh
#   2. One device call (the lane ends itself by ~480 s; 560 s leaves room for the machine's start
#      within one call and for a rerun of single stages afterwards):
#        run(command="bash scripts/gpu_lane.sh", carry=[".gpu_lane_wheels"], timeout_s=560)
#      Read files_at/gpu_lane.json (figures + status per stage) and files_at/logs/<stage>.log.
#   3. A stage that failed, rerun alone (same carry):  bash scripts/gpu_lane.sh --stages sft,engine
#
# Stages, in order of value (each under its own `timeout`; status ok / failed / skipped + reason):
#   setup    versions, GPU, offline wheels (pytest-timeout, trl) from $GPU_LANE_WHEELS
#   pytest   pytest -m gpu (per-test --timeout when pytest-timeout is present; else the stage timeout)
#   sft      benchmarks/sft_throughput.py: bf16 SFT tokens/s, peak memory, MFU on a Qwen3-1.7B-shaped
#            model (random init), lorakit vs TRL SFTTrainer + PEFT when trl (and datasets, pyarrow,
#            pandas) import; else lorakit alone and the JSON says why. MFU = tokens/s x (4 x matmul
#            weights + 6 x LoRA weights) / 989 TFLOP/s (H200 dense bf16): LoRA's frozen base does a
#            forward and an input-gradient backward, no weight gradients (see benchmarks/_report.py).
#   engine   benchmarks/multi_adapter.py: the generation engine's tokens/s at batch 1/16/64, one
#            adapter vs 8 mixed adapters vs merged, Qwen3-1.7B shape in bf16
#   grpo     2 GRPO steps on `model: demo` with the local engine in bf16 (lorakit train)
#
# Options:
#   --dry-run               the same stages on CPU with tiny shapes (seconds each): pytest -m gpu
#                           collects and skips, SFT lorakit-only on a tiny model, fp32 (tests/test_gpu_lane.py)
#   --stages a,b            run only these stages (the others are recorded as skipped)
#   --timeout stage=secs    override one stage's time limit (repeatable)
# Environment: OUT (default ./out/gpu_lane), PYTHON (default: python3 or python, whichever imports
# torch), GPU_LANE_WHEELS (default <repo>/.gpu_lane_wheels), GPU_LANE_SFT_ATTN (lorakit's train.attn_implementation in the SFT stage;
# default auto, what a user gets: flash-attn's varlen kernel, padding-free, when flash-attn is
# installed, else sdpa with padded micro-batches. flex_attention runs padding-free without
# flash-attn but compiles its kernels in each process, tens of seconds the 170 s stage may not
# have: try it in a rerun of the sft stage alone), GPU_LANE_SFT_PEER (auto | trl | none).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGES_ALL=(setup pytest sft engine grpo)
declare -A LIMIT=([setup]=25 [pytest]=150 [sft]=170 [engine]=75 [grpo]=40)
DRY=0
SELECTED=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stages) SELECTED="$2"; shift ;;
    --stages=*) SELECTED="${1#*=}" ;;
    --timeout) LIMIT[${2%%=*}]="${2#*=}"; shift ;;
    --timeout=*) v="${1#*=}"; LIMIT[${v%%=*}]="${v#*=}" ;;
    -h|--help) sed -n '2,40p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_lane.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in ${SELECTED//,/ } "${!LIMIT[@]}"; do
  case " ${STAGES_ALL[*]} " in *" $s "*) ;; *) echo "gpu_lane.sh: unknown stage '$s' (${STAGES_ALL[*]})" >&2; exit 2 ;; esac
done
for s in "${STAGES_ALL[@]}"; do
  [[ "${LIMIT[$s]}" =~ ^[0-9]+$ ]] || { echo "gpu_lane.sh: --timeout $s=${LIMIT[$s]}: seconds, a whole number" >&2; exit 2; }
done

export ROOT DRY
export OUT="${OUT:-$ROOT/out/gpu_lane}"
# The interpreter: $PYTHON, else the first of python3 / python that imports torch.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then PY="$c"; break; fi
  done
  PY="${PY:-python3}"
fi
export PY
export WHEELS="${GPU_LANE_WHEELS:-$ROOT/.gpu_lane_wheels}"
export SFT_ATTN="${GPU_LANE_SFT_ATTN:-auto}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Scratch (models, checkpoints, caches) stays off $OUT, which comes back over the wire.
export WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_lane.XXXXXX")"
export LORAKIT_CACHE="${LORAKIT_CACHE:-$WORK/cache}"
REPORT="$ROOT/scripts/gpu_lane_report.py"
export REPORT
mkdir -p "$OUT/logs" "$OUT/status"
rm -f "$OUT"/status/*.json "$OUT/gpu_lane.json"

"$PY" - "$OUT/lane.json" "$DRY" "$SELECTED" <<'PYEOF'
import json, os, subprocess, sys, time
root = os.environ["ROOT"]
def git(*args):
    try:  # the device's copy of the tree may have no .git, or no git at all
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
commit = git("rev-parse", "HEAD")
dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
json.dump({"lane": "scripts/gpu_lane.sh", "dry_run": sys.argv[2] == "1", "stages_selected": sys.argv[3] or "all",
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit or None, "dirty": dirty,
           "peak_tflops_bf16_dense": 989.0 if sys.argv[2] != "1" else None,
           "mfu_formula": "tokens/s * (4 * matmul_params + 6 * lora_params) / peak (benchmarks/_report.py)"},
          open(sys.argv[1], "w"), indent=1)
PYEOF

# Each stage: a function run under `timeout` in its own bash (timeout signals its whole process
# group, so torchrun ranks and benchmark children go too). Exit 77 = skipped, last log line = why.
need_cuda() {
  if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "skipped: no CUDA device visible to torch (use --dry-run on a CPU machine)"; exit 77
  fi
}

stage_setup() {
  local log="$OUT/status/wheels.txt" pkg mod
  : >"$log"
  for pkg in pytest-timeout trl; do
    mod="${pkg//-/_}"
    if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$mod') else 1)"; then
      echo "$pkg: already installed" >>"$log"
    elif ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      echo "$pkg: absent, and no wheels in $WHEELS (scripts/gpu_lane_wheels.sh fills it; carry it)" >>"$log"
    else
      # --dry-run resolves against the wheels without touching this machine's environment; the
      # device is a throwaway machine, so a distribution's "externally managed" Python is overridden
      local pip=("$PY" -m pip install --no-index --find-links "$WHEELS" $([ "$DRY" = 1 ] && echo --dry-run) "$pkg")
      "${pip[@]}" >"$WORK/pip-$pkg.log" 2>&1 || { grep -q externally-managed "$WORK/pip-$pkg.log" &&
        "${pip[@]}" --break-system-packages >"$WORK/pip-$pkg.log" 2>&1; }
      if [ $? = 0 ]; then
        echo "$pkg: installed from $WHEELS$([ "$DRY" = 1 ] && echo ' (pip --dry-run)')" >>"$log"
      else
        echo "$pkg: offline install failed: $(grep -m1 -E 'ERROR' "$WORK/pip-$pkg.log" || tail -n1 "$WORK/pip-$pkg.log")" >>"$log"
      fi
    fi
  done
  cat "$log"
  "$PY" "$REPORT" setup "$OUT/setup.json" "$log"
}

stage_pytest() {
  need_cuda
  local per_test=()
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout=100); else
    echo "pytest-timeout absent: the stage's own timeout is the only limit"; fi
  cd "$ROOT" && "$PY" -m pytest -m gpu -p no:cacheprovider -rs "${per_test[@]}" --junitxml="$WORK/pytest_gpu.xml" tests
  local rc=$?
  "$PY" "$REPORT" junit "$WORK/pytest_gpu.xml" "$OUT/pytest.json" || return 1
  return $rc
}

stage_sft() {
  need_cuda
  if [ "$DRY" = 1 ]; then
    # TRL's side costs two more ~10 s processes of imports: the dry run measures lorakit alone
    "$PY" "$ROOT/benchmarks/sft_throughput.py" --device cpu --shape tiny --dtypes fp32 --samples 4 --repeats 1 \
      --batch 4 --peer "${GPU_LANE_SFT_PEER:-none}" --peak-tflops 1 --json "$OUT/sft.json"
  else
    "$PY" "$ROOT/benchmarks/sft_throughput.py" --device cuda --shape qwen3-1.7b --dtypes bf16 --samples 256 \
      --repeats 3 --batch 16 --attn "$SFT_ATTN" --peer "${GPU_LANE_SFT_PEER:-auto}" --json "$OUT/sft.json"
  fi
}

stage_engine() {
  need_cuda
  if [ "$DRY" = 1 ]; then
    "$PY" "$ROOT/benchmarks/multi_adapter.py" --device cpu --dtype fp32 --shape tiny --batch 1,4 --prompt-len 8 \
      --new 4 --repeats 1 --json "$OUT/engine.json"
  else
    "$PY" "$ROOT/benchmarks/multi_adapter.py" --device cuda --dtype bf16 --shape qwen3-1.7b --batch 1,16,64 \
      --prompt-len 64 --new 32 --repeats 3 --json "$OUT/engine.json"
  fi
}

stage_grpo() {
  need_cuda
  local dev=cuda dtype=bf16 prompts=8 gens=8 new=64
  if [ "$DRY" = 1 ]; then dev=cpu dtype=fp32 prompts=2 gens=2 new=4; fi
  cd "$ROOT" && "$PY" -m lorakit train configs/grpo.yaml model=demo output_dir="$WORK/grpo" \
    data.train=examples/data/arith_rl.jsonl data.eval=null train.max_steps=2 train.save_steps=0 \
    train.eval_steps=0 train.device=$dev train.dtype=$dtype rollout.backend=local grpo.prompts_per_step=$prompts \
    rollout.num_generations=$gens rollout.max_new_tokens=$new train.batch_size=16 || return $?
  cp "$WORK/grpo/metrics.jsonl" "$OUT/grpo_metrics.jsonl"
  "$PY" "$REPORT" grpo "$WORK/grpo/metrics.jsonl" $prompts $gens "$OUT/grpo.json"
}
export -f need_cuda stage_setup stage_pytest stage_sft stage_engine stage_grpo

for name in "${STAGES_ALL[@]}"; do
  if [ -n "$SELECTED" ] && [[ ",$SELECTED," != *",$name,"* ]]; then
    "$PY" "$REPORT" status "$OUT" "$name" skipped 0 "not selected (--stages $SELECTED)"
    continue
  fi
  rm -f "$OUT/$name.json"
  limit="${LIMIT[$name]}"
  echo "== $name (limit ${limit}s)"
  start=$(date +%s%N)
  timeout --kill-after=5 "$limit" bash -c "stage_$name" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  secs="$((ms / 1000)).$(( (ms % 1000) / 100 ))"
  last="$(grep -v '^[[:space:]]*$' "$OUT/logs/$name.log" | tail -n1 | cut -c1-300)"
  case $rc in
    0) state=ok reason="" ;;
    77) state=skipped reason="${last#skipped: }" ;;
    124|137) state=failed reason="timed out after ${limit}s; last line: $last" ;;
    *) state=failed reason="exit $rc: $last" ;;
  esac
  echo "   $state ${secs}s ${reason}"
  "$PY" "$REPORT" status "$OUT" "$name" "$state" "$secs" "$reason"
  "$PY" "$REPORT" assemble "$OUT" "${STAGES_ALL[@]}"
done
"$PY" "$REPORT" assemble "$OUT" "${STAGES_ALL[@]}"
rm -rf "$WORK"
echo "lane: $OUT/gpu_lane.json"

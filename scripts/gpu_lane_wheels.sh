#!/usr/bin/env bash
# Fill .gpu_lane_wheels/ (gitignored) with the wheels the GPU lane installs offline on the device
# (scripts/gpu_lane.sh, stage setup: pip install --no-index --find-links .gpu_lane_wheels ...).
# Run it here, where there is network; then the device call carries the folder:
#   run(command="bash scripts/gpu_lane.sh", carry=[".gpu_lane_wheels"], timeout_s=560)
#
# Default: the pure-Python wheels only (~1 MB): pytest-timeout (per-test time limit), trl and
# datasets (the SFT stage's peer) and the pure pieces datasets needs beyond torch/transformers
# (dill, multiprocess for CPython 3.10-3.13). trl also needs pyarrow, pandas and xxhash, which are
# binary: the device image may have them (then TRL runs); if not, the SFT stage measures lorakit
# alone and its JSON says why. `--binary 3.12` also fetches those three for that CPython on
# manylinux x86_64 (~55 MB: close to the device tool's 64 MiB carry limit, working tree included;
# the lane's setup stage reports the device's Python version).
#
#   scripts/gpu_lane_wheels.sh [--binary PYTHON_VERSION] [--dest DIR]
set -eu

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.gpu_lane_wheels"
BINARY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY="$2"; shift ;;
    --dest) DEST="$2"; shift ;;
    *) echo "gpu_lane_wheels.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done
PIP=(python3 -m pip download --no-deps --only-binary=:all: --dest "$DEST" --quiet)
mkdir -p "$DEST"

# The versions the SFT benchmark was checked with (benchmarks/sft_throughput.py).
"${PIP[@]}" pytest-timeout==2.4.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1
for v in 3.10 3.11 3.12 3.13; do  # multiprocess ships one pure wheel per CPython version
  "${PIP[@]}" --python-version "$v" multiprocess==0.70.19
done
if [ -n "$BINARY" ]; then
  "${PIP[@]}" --python-version "$BINARY" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    pyarrow pandas xxhash
fi
ls -la "$DEST"
du -sh "$DEST"

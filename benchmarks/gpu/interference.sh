#!/bin/bash
# Benchmark 10 (interference) on a lent GPU machine, from the repository root:
#   OUT=/tmp/out bash benchmarks/gpu/interference.sh [--smoke] [flags of python -m benchmarks.interference]
# Needs python3 with torch (CUDA), transformers, safetensors, nvidia-ml-py and anyio.
# The benchmarks' shared helpers import structlog: where it is missing it is installed
# from a wheel in .whl/ (fetch it here with
# `pip download --no-deps --only-binary=:all: structlog -d .whl`; .whl is git-ignored,
# so the device tool's call names it in `carry`).
# Writes $OUT/machine.txt, $OUT/interference.txt (the tables) and
# $OUT/interference.json (every window).
set -u -o pipefail
OUT=${OUT:-/tmp/llem-interference-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import structlog" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/llem-site \
    .whl/structlog-*.whl || exit 1
  export PYTHONPATH=/tmp/llem-site${PYTHONPATH:+:$PYTHONPATH}
fi
gpu_state() {
  nvidia-smi --format=csv,noheader \
    --query-gpu=name,uuid,driver_version,temperature.gpu,power.draw,power.limit,clocks.sm
}
{
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  gpu_state
  echo "$(nproc) cores; kernel $(uname -r); $(grep MemTotal /proc/meminfo | tr -s ' ')"
  python3 -c "import torch, transformers, safetensors, pynvml; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'safetensors', safetensors.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
python3 -m benchmarks.interference --json "$OUT/interference.json" "$@" 2>&1 \
  | tee "$OUT/interference.txt"
status=$?
{ echo "after:"; gpu_state; } 2>&1 | tee -a "$OUT/machine.txt"
exit $status

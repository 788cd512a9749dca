#!/bin/bash
# The GPU-never-waits sweep on one GPU (issue 34), from the repository root:
#   OUT=/tmp/out bash examples/llm_energy/adaptive.sh
# Writes random Llama-1B weights once, warms the page cache, runs study-adaptive.yaml
# (4 configs, prepare phase, prestart depth auto, 2 s cooldown, 3-6 cycles until
# J/token is known to 2%), and prints adaptive_summary.py's gaps, prestart count and
# per-config spread. RUNS=N repeats the sweep N times (each its own results dir).
set -u
OUT=${OUT:-/tmp/llem-adaptive-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import llem_dispatch.cli, torch, transformers; print('torch', torch.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))" || exit 1
nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader
nproc
cd examples/llm_energy
python3 experiment.py --write-weights /tmp/llem-weights ${MODELS:-llama-1b} || exit 1
for run in $(seq 1 "${RUNS:-1}"); do
  cat /tmp/llem-weights/*/*.safetensors >/dev/null  # the same warm page cache each time
  start=$(date +%s.%N)
  timeout -s INT "${SWEEP_LIMIT_S:-500}" python3 -m llem_dispatch.cli run study-adaptive.yaml \
    --runner local --gpus auto --results "$OUT/adaptive-$run" --plain >"$OUT/adaptive-$run.log" 2>&1
  echo "sweep $run: exit $?, $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
  python3 adaptive_summary.py "$OUT/adaptive-$run" --cooldown 2 | tee "$OUT/adaptive-$run.md"
done
cd "$OUT" && tar czf results.tgz --exclude='*.tgz' $(ls -d */ 2>/dev/null) && rm -rf -- */

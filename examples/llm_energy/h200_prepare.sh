#!/bin/bash
# The prepare-phase comparison on one GPU (issue 28), from the repository root:
#   OUT=/tmp/out bash examples/llm_energy/h200_prepare.sh
# Writes random Llama weights once (safetensors, local disk), warms the page cache,
# then runs study-disk.yaml (weights read after the gate) and study-disk-prepare.yaml
# (read before it, a prepare phase), both prestarted with a 2 s cooldown, and prints
# each one's idle-gap table. LLEM_WHEELS: a folder of wheels for missing packages.
set -u
OUT=${OUT:-/tmp/llem-prepare-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${LLEM_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --find-links "$LLEM_WHEELS" \
    aiodocker aiohttp structlog typer rich pyyaml anyio pydantic 2>&1 | tail -3
fi
export PYTHONPATH=$PWD/src
python3 -c "import llem_dispatch.cli, torch, transformers, safetensors; \
print('torch', torch.__version__, 'transformers', transformers.__version__, \
'safetensors', safetensors.__version__, torch.cuda.get_device_name(0))" || exit 1
nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader
grep -E 'MemTotal|MemAvailable' /proc/meminfo
cd examples/llm_energy
python3 experiment.py --write-weights /tmp/llem-weights ${MODELS:-llama-1b llama-8b} || exit 1
du -sh /tmp/llem-weights/*
for variant in ${VARIANTS:-disk disk-prepare}; do
  cat /tmp/llem-weights/*/*.safetensors >/dev/null  # the same warm page cache for each
  start=$(date +%s.%N)
  timeout -s INT "${SWEEP_LIMIT_S:-240}" python3 -m llem_dispatch.cli run "study-$variant.yaml" \
    --runner local --gpus auto --results "$OUT/$variant" --plain >"$OUT/$variant.log" 2>&1
  echo "$variant: exit $?, $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
  python3 idle_gaps.py "$OUT/$variant" --cooldown 2 | tee "$OUT/$variant-gaps.md"
  grep -E 'MemAvailable' /proc/meminfo
done
cd "$OUT" && tar czf results.tgz --exclude='*.tgz' $(ls -d */ 2>/dev/null) && rm -rf -- */

#!/bin/bash
# The isolation comparison on one GPU (issue 33), from the repository root:
#   OUT=/tmp/out bash examples/llm_energy/isolation.sh
# Writes random Llama-1B weights once, then runs study-isolation.yaml as three
# variants in alternating rounds (off, pause, run, then run, pause, off): prestart
# off, prestart with preparation paused during measured windows (the default), and
# prestart with preparation running beside them. isolation_summary.py prints J/token
# and tokens/s per variant and batch (mean, cv across cycles) and the GPU's idle
# time beyond the cooldown.
set -u
OUT=${OUT:-/tmp/llem-isolation-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import llem_dispatch.cli, torch, transformers; print('torch', torch.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))" || exit 1
nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader
nproc
cd examples/llm_energy
python3 experiment.py --write-weights /tmp/llem-weights ${MODELS:-llama-1b} || exit 1
variant() {  # NAME KEY=VALUE...: study-isolation.yaml with those top-level keys
  local name=$1; shift
  python3 - "$name" "$@" <<'PY'
import sys, yaml
name, pairs = sys.argv[1], sys.argv[2:]
study = yaml.safe_load(open("study-isolation.yaml"))
for pair in pairs:
    key, value = pair.split("=", 1)
    study[key] = yaml.safe_load(value)
study["name"] = f"isolation-{name}"
yaml.safe_dump(study, open(f".isolation-{name}.yaml", "w"))
PY
}
variant off prestart=false
variant pause prestart=true prepare_during_measurement=pause
variant run prestart=true prepare_during_measurement=run
round=0
for order in "${ORDER1:-off pause run}" "${ORDER2:-run pause off}"; do
  round=$((round + 1))
  for name in $order; do
    cat /tmp/llem-weights/*/*.safetensors >/dev/null  # the same warm page cache for each
    start=$(date +%s.%N)
    timeout -s INT "${SWEEP_LIMIT_S:-150}" python3 -m llem_dispatch.cli run \
      ".isolation-$name.yaml" --runner local --gpus auto \
      --results "$OUT/$name-r$round" --plain >"$OUT/$name-r$round.log" 2>&1
    echo "$name round $round: exit $?, $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
  done
done
rm -f .isolation-*.yaml
python3 isolation_summary.py "$OUT" --cooldown 2 | tee "$OUT/summary.md"
cd "$OUT" && tar czf results.tgz --exclude='*.tgz' $(ls -d */ 2>/dev/null) && rm -rf -- */

#!/usr/bin/env bash
# Latency baselines, golden outputs, the JSON summary and the HF-vs-DS plot, in one command, on a GPU machine.
#
#   bash scripts/gpu_baselines.sh pythia-160m pythia-1b            # record (--neox-update-baselines)
#   MODE=check bash scripts/gpu_baselines.sh pythia-160m pythia-1b # compare against BASELINES (run-to-run spread)
#
# Environment: OUT (default /tmp/out) receives baselines/, report-<model>/ (neoxmii-summary.json,
# latency-<model>.png), bench-<model>.json (pytest-benchmark, with machine_info), junit-<model>.xml, the logs
# and hf-vs-ds.png (every model in one figure). BASELINES (default $OUT/baselines) is where baselines are
# written (record) or read (check); copy $OUT/baselines/* into the repository's baselines/ to commit them.
# BACKENDS (default ds,mii; hf is always measured). Wheels in .whl/ are installed first when present (the lent
# GPU machines have no registry), as scripts/gpu_validate.sh does.
set -u
MODE=${MODE:-update}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BASELINES=${BASELINES:-$OUT/baselines}
BACKENDS=${BACKENDS:-ds,mii}
plugin=()
if ls .whl/*.whl >/dev/null 2>&1; then
  source scripts/device-install.sh || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  plugin=(-p pytest_neoxmii.plugin)     # the checkout is on PYTHONPATH, not installed: no entry point
fi
# The image may preset TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's op builder cannot parse: set it here.
export TORCH_CUDA_ARCH_LIST=${NEOX_CUDA_ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
flag=""
[ "$MODE" = update ] && flag="--neox-update-baselines"
summaries=()
for model in "$@"; do
  start=$(date +%s)
  python3 -m pytest pytest_neoxmii/suite/test_latency.py pytest_neoxmii/suite/test_golden.py "${plugin[@]}" \
    --neox-model="$model" --neox-weights=synthetic --neox-backends="$BACKENDS" \
    --neox-baseline-dir="$BASELINES" --neox-report="$OUT/report-$model" $flag \
    --benchmark-json="$OUT/bench-$model.json" --junitxml="$OUT/junit-$model.xml" \
    -q -rs -p no:cacheprovider --durations=10 ${NEOX_EXTRA:-} 2>&1 | grep -v "^\[20" | tee "$OUT/$MODE-$model.log"
  echo "wall $model: $(( $(date +%s) - start )) s" | tee -a "$OUT/$MODE-$model.log"
  summaries+=("$OUT/report-$model/neoxmii-summary.json")
done
python3 -m pytest_neoxmii.plot "${summaries[@]}" -o "$OUT/hf-vs-ds.png"

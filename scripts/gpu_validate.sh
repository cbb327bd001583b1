#!/usr/bin/env bash
# Runs on the lent GPU machine (no registry there): installs the carried wheels, then the acceptance suite.
# Usage: bash scripts/gpu_validate.sh MODEL [MODEL...]   (logs and reports go to $OUT)
set -u
source scripts/device-install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)"
for model in "$@"; do
  start=$(date +%s)
  python3 -m pytest tests/acceptance -p pytest_neoxmii.plugin --neox-model="$model" --neox-weights=synthetic \
    -q -rs -p no:cacheprovider --durations=10 ${NEOX_EXTRA:-} 2>&1 | grep -v "^\[20" | tee "$OUT/acceptance-$model.log"
  echo "wall $model: $(( $(date +%s) - start )) s" | tee -a "$OUT/acceptance-$model.log"
done

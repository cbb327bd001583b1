#!/usr/bin/env bash
# Multi-GPU validation of the tensor-parallel deployments, on the lent 2-GPU machine (no registry there):
# installs the carried wheels like gpu_validate.sh, then runs scripts/validate_multi_gpu.py, which keeps to
# a time budget (VALIDATE_BUDGET_S, default 560 s from now) and writes $OUT/multi_gpu.json after each phase.
# Usage: bash scripts/validate_multi_gpu.sh [PHASE...]
#   default phases: env kernels parity cycles sigint large (large only if its estimate fits the time left);
#   then, as runs of their own: `kernels large`, `kernels neox20b` (gpt-neox-20b MII tp=2 deploy + generate)
set -u
export VALIDATE_START=$(date +%s)
if [ ! -d /tmp/site/deepspeed ]; then
  source scripts/device-install.sh || exit 1
fi
# The image may preset TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed 0.19.8's op builder cannot parse: force 9.0.
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast stays off in every process started here (the deployments set it again for theirs).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT=${OUT:-/tmp/out} NEOXMII_CACHE=${NEOXMII_CACHE:-/tmp/neoxmii-cache}
export NEOXMII_RUN_DIR=$OUT/runs
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 scripts/validate_multi_gpu.py "$@" 2>&1 | grep -v "^\[20" | tee "$OUT/validate.log"
echo "wall: $(( $(date +%s) - VALIDATE_START )) s" | tee -a "$OUT/validate.log"

#!/usr/bin/env bash
# The plugin's own unit suite on a GPU machine (docs/SPEED.md, twenty-fifth round):
#
#   bash scripts/gpu_unit_suite.sh DIR [pytest args]
#
# The unit tests start pytest sessions of their own (pytester), which find the plugin through its pytest11 entry
# point: loaded with `-p pytest_neoxmii.plugin` from the checkout instead, every such session fails with
# "unrecognized arguments: --neox-model". So the plugin is installed here, into /tmp/site beside the wheels of
# .whl/ (the lent GPU machines have no registry; scripts/device-install.sh), without its dependencies.
# The tests of CPU sessions hide the GPUs from their runs (tests/unit/conftest.py, on_the_cpu); the fork server's
# tests skip, saying they need a machine without GPUs. Writes DIR/unit.log and DIR/gpu.txt.
# Environment: NEOX_UNIT_WORKERS (pytest-xdist workers, default 8; 0 runs in one process).
set -u
OUT=${1:?usage: bash scripts/gpu_unit_suite.sh DIR [pytest args]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
  source scripts/device-install.sh || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . \
  > "$OUT/install.txt" 2>&1 || { echo "gpu_unit_suite.sh: could not install the plugin: see $OUT/install.txt" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# The image may preset TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's op builder cannot parse.
export TORCH_CUDA_ARCH_LIST=${NEOX_CUDA_ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-16} NCCL_NVLS_ENABLE=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  echo "cpus $(nproc)"; } > "$OUT/gpu.txt"
workers=()
[ "${NEOX_UNIT_WORKERS:-8}" = 0 ] || workers=(-n "${NEOX_UNIT_WORKERS:-8}")
python3 -m pytest tests/unit -q -p no:cacheprovider -rfs "${workers[@]}" "$@" > "$OUT/unit.log" 2>&1
rc=$?
echo "unit suite: pytest exit $rc; $(tail -1 "$OUT/unit.log")"
exit $rc

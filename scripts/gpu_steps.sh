#!/usr/bin/env bash
# One device call, several validation steps, each under its own time limit and all within a budget, so that
# a call never runs past the lent machine's 10 minutes (the steps' own scripts are reused):
#
#   GPU_BUDGET_S=560 bash scripts/gpu_steps.sh STEP...       (results under $OUT/<step>/)
#
# Steps:
#   bench                   scripts/bench_suite.sh, pythia-160m cold then warm (issue 10's breakdown)
#   family:MODEL[,MODEL..]  scripts/gpu_family.sh: parity and reference checks of each size, all backends
#                           (FAMILY_BACKENDS=hf,ds,mii to leave one out)
#   planted                 pythia-1b tp=2, ds and mii, with one layer's attention output scaled x1.05
#                           (NEOXMII_PLANT_FAULT): the greedy and teacher-forced judges must fail
#   noise                   scripts/latency_noise.py: hf's latency on pythia-160m under one change at a time (GC
#                           off, pinned to a core, a pytest-sized heap), then the suite's hf latency tests alone
#   neox20b                 gpt-neox-20b fp16 tp=2, ds, each worker capped at 40 GiB per GPU: deploy, parity on
#                           the default cases, latency
# Every model is synthetic (seed 0): the results say nothing of real checkpoints' numbers.
set -u
START=$(date +%s); BUDGET=${GPU_BUDGET_S:-560}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/device-install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
export NEOXMII_RUN_DIR=$OUT/runs
CACHE=/tmp/neox-cache
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
suite() {   # suite NAME LIMIT pytest-args...: one pytest session, its log and report under $OUT/NAME
  local name=$1 limit=$2; shift 2
  mkdir -p "$OUT/$name"
  local t0=$(date +%s)
  timeout -k 10 "$limit" python3 -m pytest -p pytest_neoxmii.plugin --neox-weights=synthetic \
    --neox-cache-dir="$CACHE" --neox-report="$OUT/$name/report" -q -rsxXf -p no:cacheprovider "$@" \
    > "$OUT/$name/pytest.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc wall=$(( $(date +%s) - t0 ))s $(grep -E '^(=+ )?[0-9]+ (passed|failed|xfailed|skipped|error)' "$OUT/$name/pytest.log" | tail -1)" \
    | tee -a "$OUT/steps.txt"
}
for step in "$@"; do
  budget=$(left)
  if [ "$budget" -lt 60 ]; then echo "$step: not run, ${budget}s left of the budget" | tee -a "$OUT/steps.txt"; continue; fi
  case "$step" in
    bench)
      timeout -k 10 $((budget - 20)) bash scripts/bench_suite.sh "$OUT/bench" 2>&1 | tail -40 ;;
    family:*)
      OUT=$OUT/family FAMILY_LIMIT_S=$((budget - 30)) NEOX_BACKENDS=${FAMILY_BACKENDS:-hf,ds,mii,zero} \
        timeout -k 10 $((budget - 10)) bash scripts/gpu_family.sh $(echo "${step#family:}" | tr ',' ' ') 2>&1 | tail -30 ;;
    planted)
      NEOXMII_PLANT_FAULT=attention-output-scale:8:1.05 suite planted $((budget - 10)) \
        pytest_neoxmii/suite/test_multi_gpu.py --neox-model=pythia-1b --neox-tp=2 --neox-backends=ds,mii ;;
    noise)
      mkdir -p "$OUT/noise"
      model=$(python3 -c "from pathlib import Path; from pytest_neoxmii import weights; from pytest_neoxmii.registry import lookup; print(weights.build_synthetic(lookup('pythia-160m'), 0, Path('$CACHE')))")
      timeout -k 10 $((budget / 2)) python3 scripts/latency_noise.py "$model" "$OUT/noise" ${NOISE_ROUNDS:-10} ${NOISE_BLOCKS:-3} \
        2>&1 | grep -v "^\[20" | tee "$OUT/noise/noise.txt"
      [ "${NOISE_SUITE:-1}" = 1 ] && suite noise-suite $((budget / 2 - 10)) tests/acceptance -k "test_latency and hf" --neox-model=pythia-160m \
        --neox-backends=ds ${NOISE_EXTRA:-} ;;
    neox20b)
      # NEOX20B_SELECT / NEOX20B_EXTRA narrow it, e.g. to the registry's fit test alone:
      #   NEOX20B_SELECT="registry_says_it_fits or workspace" NEOX20B_EXTRA=--neox-reference-first=never
      suite neox20b $((budget - 10)) tests/acceptance/ -k "${NEOX20B_SELECT:-parity or latency or multi_gpu or workspace}" \
        --neox-model=gpt-neox-20b --neox-tp=2 --neox-backends=ds --neox-gpu-memory-cap=40GiB ${NEOX20B_EXTRA:-} ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "total wall $(( $(date +%s) - START ))s" | tee -a "$OUT/steps.txt"

#!/usr/bin/env bash
# Runs on the lent GPU machine: the Pythia family with synthetic weights (seed 0), one pytest session per size
# (parity and reference checks, default cases), each under a time limit so one size cannot eat the call.
# Usage: FAMILY_LIMIT_S=240 NEOX_BACKENDS=hf,ds,mii bash scripts/gpu_family.sh pythia-70m pythia-160m ...
#        BUILD_ONLY=gpt-neox-20b bash scripts/gpu_family.sh     (time the synthetic weight build alone)
# Everything lands under $OUT/family/ as it is written (logs, JSON summaries, weight provenance; a session cut
# short by its limit or the call's keeps what it wrote) and in $OUT/family.txt (figures).
set -u
source scripts/device-install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; W=$OUT/family; mkdir -p "$OUT" "$W"
CACHE=${NEOX_CACHE:-/tmp/neox-cache}
LIMIT=${FAMILY_LIMIT_S:-300}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc;
  python3 -c "import torch, transformers, numpy; print(torch.__version__, transformers.__version__, numpy.__version__)"
  df -h /tmp | tail -1; } | tee "$W/machine.txt"
python3 - <<'PY' | tee -a "$W/machine.txt"
from pytest_neoxmii import weights
from pytest_neoxmii.registry import lookup
print("fingerprint pythia-14m seed 0:", weights.fingerprint(weights.synthetic_state_dict(lookup("pythia-14m"), 0)))
PY
if [ -n "${BUILD_ONLY:-}" ]; then
  for m in $BUILD_ONLY; do
    python3 - "$m" "$CACHE" <<'PY' 2>&1 | tee -a "$W/build.txt"
import json, sys, time
from pathlib import Path
from pytest_neoxmii import weights
from pytest_neoxmii.registry import lookup
t = time.perf_counter(); path = weights.build_synthetic(lookup(sys.argv[1]), 0, Path(sys.argv[2]))
p = json.loads((path / weights.PROVENANCE_FILE).read_text())
print(sys.argv[1], "build total", round(time.perf_counter() - t, 1), "s; safetensors", p["build"])
PY
    [ -n "${KEEP:-}" ] || rm -rf "$CACHE/synthetic/$m-"*
  done
fi
for model in "$@"; do
  start=$(date +%s)
  timeout -k 10 "$LIMIT" python3 -m pytest pytest_neoxmii/suite/test_parity.py pytest_neoxmii/suite/test_reference.py \
    -p pytest_neoxmii.plugin --neox-model="$model" --neox-weights=synthetic --neox-cache-dir="$CACHE" \
    --neox-backends="${NEOX_BACKENDS:-hf,ds,mii}" --neox-report="$W/report-$model" \
    -v -rsxX -p no:cacheprovider ${NEOX_EXTRA:-} > "$W/$model.log" 2>&1
  rc=$?
  tail -n 25 "$W/$model.log" | grep -v "^\[20"
  line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|xfailed|skipped|error)" "$W/$model.log" | tail -1)
  echo "$model rc=$rc wall=$(( $(date +%s) - start ))s $line" | tee -a "$W/family.txt"
  grep -h '"gb_per_s"\|"seconds"\|"bytes"' "$CACHE"/synthetic/"$model"-seed0-*/neoxmii_synthetic.json 2>/dev/null \
    | tr -d ' \n' | sed "s/^/$model weights build: /" | tee -a "$W/family.txt"; echo | tee -a "$W/family.txt"
  cp "$CACHE"/synthetic/"$model"-seed0-*/neoxmii_synthetic.json "$W/provenance-$model.json" 2>/dev/null
  [ -n "${KEEP:-}" ] || rm -rf "$CACHE/synthetic/$model-"*
done
cat "$W/machine.txt" "$W/build.txt" "$W/family.txt" > "$OUT/family.txt" 2>/dev/null

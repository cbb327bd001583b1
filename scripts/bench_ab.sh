#!/usr/bin/env bash
# Same-machine comparison of two versions of the plugin (issue 10): launch-bound figures follow the host
# CPU's speed (docs/STACK.md trap 19), and the lent machines differ from call to call, so a before/after
# comparison is only fair on one machine, with the runs interleaved.
#
#   BASE=DIR bash scripts/bench_ab.sh OUT [RUN...]
#
# BASE: a tree of the other version (e.g. `git archive <rev> | tar -x -C base`). Each RUN is one pytest
# session of the acceptance suite, pythia-160m synthetic (seed 0), default cases, all backends:
#   cold-new | cold-base   empty kernel and weight caches;  warm-new | warm-base   both caches hot;
#   a "+zeroN" suffix runs it with NEOXMII_ZERO_AHEAD_WORKERS=N; "+profile" under cProfile (OUT/RUN.prof).
# Default: cold-new warm-base warm-new warm-base warm-new. Writes OUT/RUN.log, OUT/RUN/ (report) and
# OUT/RUN.wall; prints one line per run (session, phases, tests) as it ends.
set -u
OUT=${1:?usage: BASE=DIR bash scripts/bench_ab.sh OUT [RUN...]}; shift
RUNS=${*:-cold-new warm-base warm-new warm-base warm-new}
BASE=${BASE:?set BASE to a tree of the other version}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); BASE=$(cd "$BASE" && pwd); NEW=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  source scripts/device-install.sh || exit 1
fi
export TORCH_CUDA_ARCH_LIST=${NEOX_CUDA_ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d /tmp/bench-ab.XXXXXX)
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
for run in $RUNS; do
  name=${run%%+*}; tree=$NEW; [ "${name#*-}" = base ] && tree=$BASE
  prof=(); zero=()
  case "$run" in *+zero[0-9]*) n=${run##*+zero}; zero=(NEOXMII_ZERO_AHEAD_WORKERS=${n%%+*}) ;; esac
  case "$run" in *+profile*) prof=(-m cProfile -o "$OUT/$run.prof") ;; esac
  if [ "${name%%-*}" = cold ]; then rm -rf "$TORCH_EXTENSIONS_DIR" "$WORK/cache"; fi
  start=$(date +%s%N)
  (cd "$tree" && env "${zero[@]}" PYTHONPATH=/tmp/site:$tree python3 "${prof[@]}" -m pytest tests/acceptance \
     -p pytest_neoxmii.plugin --neox-model=pythia-160m --neox-weights=synthetic --neox-cache-dir="$WORK/cache" \
     --neox-report="$OUT/$run" -q -rs -p no:cacheprovider 2>&1 | grep -v "^\[20" > "$OUT/$run.log")
  awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f\n", (b - a) / 1e9 }' > "$OUT/$run.wall"
  echo "$run: $(cat "$OUT/$run.wall") s wall; $(grep -E '^time:' "$OUT/$run.log" | tail -1); $(tail -1 "$OUT/$run.log")"
done
rm -rf "$WORK"

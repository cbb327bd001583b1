#!/usr/bin/env bash
# How long the acceptance suite takes on a GPU machine, cold and then warm (issue 10's benchmark):
#
#   bash scripts/bench_suite.sh DIR [MODEL]        # MODEL default pythia-160m (synthetic weights, seed 0)
#
# Runs the suite twice in a row (more warm runs with BENCH_WARM_RUNS=N), default cases, all backends (hf, ds,
# mii, zero):
#   cold: an empty TORCH_EXTENSIONS_DIR (DeepSpeed's kernels JIT-build) and an empty weight cache (the
#         synthetic model is built);
#   warm: the same command again, both caches hot.
# Writes to DIR: cold.log / warm.log (pytest's output with --durations), report-cold/ and report-warm/ (the
# plugin's JSON summary, summary.md, plot), bench-*.json (pytest-benchmark), junit-*.xml, gpu.txt and
# breakdown.txt: the plugin's phase breakdown of both runs side by side (kernel build, model load, model calls,
# timed benchmark calls, other), the wall time of the whole pytest command, the test outcomes, each latency
# figure's rounds / stop reason / CI half-width, and whether every parity and golden verdict is the same in both.
#
# The lent GPU machines have no registry: wheels in .whl/ are installed into /tmp/site first and the checkout
# is put on PYTHONPATH (the plugin is then loaded with -p pytest_neoxmii.plugin), as scripts/gpu_baselines.sh.
# Environment: NEOX_CUDA_ARCH (default 9.0, H100/H200), MAX_JOBS (default 16), NEOX_EXTRA (more pytest args).
set -u
OUT=${1:?usage: bash scripts/bench_suite.sh DIR [MODEL]}
case "${BENCH_WARM_RUNS:-1}" in
  ''|*[!0-9]*|0) echo "bench_suite.sh: BENCH_WARM_RUNS is a number of warm runs, 1 or more (got '${BENCH_WARM_RUNS}')" >&2; exit 2 ;;
esac
MODEL=${2:-pythia-160m}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
  source scripts/device-install.sh || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
plugin=()
python3 -c "import importlib.metadata as m; m.distribution('pytest-neoxmii')" 2>/dev/null || plugin=(-p pytest_neoxmii.plugin)
# The image may preset TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's op builder cannot parse: set it here.
export TORCH_CUDA_ARCH_LIST=${NEOX_CUDA_ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d /tmp/bench-suite.XXXXXX)
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
CACHE=$WORK/neox-cache
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  echo "cpus $(nproc)"; } | tee "$OUT/gpu.txt"

# BENCH_WARM_RUNS: how many warm runs (warm, warm2, ...): a warm session moves by seconds with the host.
runs="cold warm"
for i in $(seq 2 "${BENCH_WARM_RUNS:-1}"); do runs="$runs warm$i"; done
for run in $runs; do
  if [ "$run" = cold ]; then rm -rf "$TORCH_EXTENSIONS_DIR" "$CACHE"; fi
  start=$(date +%s%N)
  python3 -m pytest tests/acceptance "${plugin[@]}" --neox-model="$MODEL" --neox-weights=synthetic \
    --neox-cache-dir="$CACHE" --neox-report="$OUT/report-$run" --benchmark-json="$OUT/bench-$run.json" \
    --junitxml="$OUT/junit-$run.xml" -q -rs -p no:cacheprovider --durations=15 ${NEOX_EXTRA:-} 2>&1 \
    | grep -v "^\[20" > "$OUT/$run.log"
  rc=${PIPESTATUS[0]}
  awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f\n", (b - a) / 1e9 }' > "$OUT/$run.wall"
  echo "$run: pytest exit $rc, $(cat "$OUT/$run.wall") s wall; $(tail -1 "$OUT/$run.log")"
done

python3 - "$OUT" $runs <<'PY' | tee "$OUT/breakdown.txt"
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
runs = {}
for run in sys.argv[2:]:
    path = out / f"report-{run}" / "neoxmii-summary.json"
    if not path.is_file():
        print(f"{run}: no report ({path} missing; see {run}.log)")
        continue
    s = json.loads(path.read_text())
    suite = ET.parse(out / f"junit-{run}.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    runs[run] = {"summary": s, "wall": float((out / f"{run}.wall").read_text()),
                 "tests": {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}}
if not runs:
    sys.exit(1)
first = next(iter(runs.values()))["summary"]
print(f"model {first['model']['description']}; {first['hardware']['description']}; dtype {first['dtype']}")
for run, r in runs.items():
    k = r["summary"].get("kernels") or {}
    print(f"{run}: kernels {k.get('cached')} in {k.get('directory')}")
phases = list(dict.fromkeys(p for r in runs.values() for p in r["summary"]["timings_s"]))
print(f"\n{'phase':<28}" + "".join(f"{run:>10}" for run in runs))
for p in phases:
    print(f"{p:<28}" + "".join(f"{r['summary']['timings_s'].get(p, 0.0):>9.1f}s" for r in runs.values()))
print(f"{'whole pytest command':<28}" + "".join(f"{r['wall']:>9.1f}s" for r in runs.values()))
for run, r in runs.items():
    t = r["tests"]
    other = r["summary"]["timings_s"].get("other (plugin and pytest)", 0.0)
    print(f"{run}: {t['tests']} tests, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped; "
          f"plugin and pytest overhead {100 * other / r['summary']['timings_s']['session']:.1f}% of the session")
print("\nlatency (end-to-end median, 95% CI half-width, rounds and why they stopped, seconds of timing):")
for run, r in runs.items():
    for row in r["summary"]["latency"]:
        ci = row.get("e2e_ci_half_width_pct")
        print(f"  {run} {row['backend']:<5} bs{row['batch_size']}: {row['e2e_p50_s'] * 1e3:8.2f} ms "
              f"+-{'-' if ci is None else f'{ci:.1f}'}% {row['rounds']:>3} rounds ({row.get('stop_reason')}), "
              f"{row.get('timing_s') or 0:.1f} s")
def verdicts(s):
    return {(rec["check"], rec["backend"], rec["case"]): rec["passed"] for rec in s["records"]
            if rec["check"] != "latency"}
if "cold" in runs:
    cold = verdicts(runs["cold"]["summary"])
    for run in [r for r in runs if r != "cold"]:
        warm = verdicts(runs[run]["summary"])
        changed = sorted(k for k in cold.keys() | warm.keys() if cold.get(k) != warm.get(k))
        print(f"\nparity/golden verdicts: {len(cold)} cold, {len(warm)} {run}, "
              + ("all the same" if not changed else f"{len(changed)} differ: {changed[:10]}"))
PY
rm -rf "$WORK"

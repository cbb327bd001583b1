"""The golden-output checks of one backend: record (--neox-update-baselines) or compare the greedy ids of a
generating case and the perplexity of the fixed text, with golden.py's format and comparison, through the
baseline policy; the verdict goes to the report, and a change fails with which cases changed and how."""
from __future__ import annotations

import math

import pytest

from pytest_neoxmii import backends as engines
from pytest_neoxmii import parity
from pytest_neoxmii.checks.baseline_policy import BaselinePolicy
from pytest_neoxmii.checks.parity import config_note, mark_known_issue
from pytest_neoxmii.golden import (CaseChange, GoldenSummary, PerplexityChange, compare_case, compare_perplexity,
                                   golden_case, perplexity, prompt_digest, version_changes)
from pytest_neoxmii.session import Record
from pytest_neoxmii.versions import installed_versions


def _golden_backend(neox, name: str):
    """hf's golden outputs are those of fp32 HF (the ground truth); every other backend's at its dtype."""
    return neox.reference() if engines.is_reference(name) else neox.backend(name)


def _source(policy: BaselinePolicy, src_cls: str) -> str:
    """Where the golden outputs came from: the file and GPU class (another class's, when this one has none)."""
    return (f"{policy.where}, GPU class {src_cls}"
            + ("" if src_cls == policy.gpu_class else f", this machine is {policy.gpu_class}"))


def check_golden(neox, backend_name: str, case, request=None) -> CaseChange | None:
    """Record (--neox-update-baselines) or compare the golden greedy output of one case on one backend."""
    if not case.plan.generate:
        pytest.skip(f"{case.id} is scored teacher-forced only")
    backend = _golden_backend(neox, backend_name)
    known = mark_known_issue(request, "greedy", backend, case)   # a known decode defect has no golden output
    policy = BaselinePolicy.of(neox, backend_name, backend.info, request)
    # Read first: an unusable file fails (and a missing one skips) before any model call.
    got = policy.expected(lambda store: store.golden(policy.key, policy.gpu_class), "golden outputs (greedy ids)",
                          plural=True)
    gen = neox.generation(backend, case)
    top_k = neox.options.top_k
    if policy.recording:
        bad = parity.find_nonfinite(gen, f"{backend_name} {backend.info.dtype} generation of {case.id}")
        if bad:     # a golden output is what a correct run answers: NaN/Inf never is (nor valid JSON)
            neox.record(Record("golden", backend_name, case.id, False, {"status": "non-finite"},
                               parity.find_nonfinite(gen, case.id), known))
            pytest.fail(f"not recorded as a golden output: {bad}", pytrace=False)
        versions = installed_versions()
        entry = golden_case(case.batch, gen, case.plan.max_new_tokens, top_k, versions)
        path = policy.record(lambda store: store.put_golden(policy.key, policy.gpu_class,
                                                            {"cases": {case.id: entry}, "versions": versions}))
        neox.record(Record("golden", backend_name, case.id, True, {"status": "recorded"},
                           f"recorded for GPU class {policy.gpu_class} in {path}"))
        print(f"golden output of {case.id} ({backend.info.describe()}) written to {path}")
        return None

    src_cls, golden = got
    stored = golden["cases"].get(case.id)
    if stored is None:
        policy.skip_missing(f"golden output for case {case.id}", _source(policy, src_cls))
    change = compare_case(case.id, stored, gen, case.batch, case.plan.max_new_tokens, top_k)
    summary = GoldenSummary(f"{backend_name} {backend.info.dtype}", [change],
                            versions=version_changes(stored.get("versions", golden.get("versions")),
                                                     installed_versions()),
                            source=_source(policy, src_cls))
    metrics = {"status": change.status, "first_divergence": change.first_divergence, "gpu_class": src_cls,
               "detail": change.detail}
    note = config_note(neox, backend_name, case, "greedy", metrics)
    neox.record(Record("golden", backend_name, case.id, change.passed if change.status != "not-comparable"
                       else None, metrics, change.line(), known))
    if request is not None:
        request.node.user_properties.append(("golden_status", change.status))
    print(summary.text())
    if change.status == "not-comparable":
        policy.skip_stale(f"golden output of {case.id} not comparable: {change.detail}")
    if not change.passed:
        pytest.fail(note + summary.text() + "\n" + change.report.message(), pytrace=False)
    return change


def fixed_text_case(neox):
    plan = next(p for p in neox.plans() if p.family == "fixed-text")
    return neox.case(plan)


def session_floor(neox, case) -> float | None:
    """The perplexity noise floor of this session: HF at the session's dtype against HF fp32."""
    ref, _ = perplexity(neox.scores(neox.reference(), case), case.batch)
    low, _ = perplexity(neox.scores(neox.peer(), case), case.batch)
    if ref is None or low is None or not ref > 0:
        return None
    return abs(low - ref) / ref


def check_golden_perplexity(neox, backend_name: str, request=None) -> PerplexityChange | None:
    """Record or compare the perplexity of the fixed text on one backend."""
    case = fixed_text_case(neox)
    backend = _golden_backend(neox, backend_name)
    policy = BaselinePolicy.of(neox, backend_name, backend.info, request)
    got = policy.expected(lambda store: store.golden(policy.key, policy.gpu_class), "golden outputs (perplexity)",
                          plural=True)
    ppl, targets = perplexity(neox.scores(backend, case), case.batch)
    floor = session_floor(neox, case)
    if ppl is None or not math.isfinite(ppl):
        pytest.fail(f"{backend.info.describe()}: perplexity of the fixed text is {ppl} (no finite value)",
                    pytrace=False)
    if policy.recording:
        path = policy.record(lambda store: store.put_golden(policy.key, policy.gpu_class, {
            "cases": {}, "perplexity": ppl, "versions": installed_versions(), "perplexity_detail": {
                "targets": targets, "case": case.id, "prompt_sha256": prompt_digest(case.batch),
                "noise_floor_rel": floor, "dtype": backend.info.dtype}}))
        neox.record(Record("golden-perplexity", backend_name, case.id, True, {"perplexity": ppl},
                           f"recorded {ppl:.4f} for GPU class {policy.gpu_class} in {path}"))
        print(f"golden perplexity {ppl:.4f} of {backend.info.describe()} written to {path}")
        return None

    src_cls, golden = got
    detail = golden.get("perplexity_detail") or {}
    if golden.get("perplexity") is None:
        policy.skip_missing("golden perplexity", _source(policy, src_cls))
    if detail.get("prompt_sha256") not in (None, prompt_digest(case.batch)):
        policy.skip_stale("the golden perplexity was measured on other token ids of the fixed text (another "
                          "tokenizer)")
    # A low-precision golden of another machine brings that machine's own noise (golden.PerplexityChange).
    elsewhere = src_cls != policy.gpu_class and detail.get("dtype", backend.info.dtype) != "fp32"
    change = compare_perplexity(golden["perplexity"], ppl, floor, neox.options.parity_multiple,
                                src_cls if elsewhere else None, detail.get("noise_floor_rel") if elsewhere else None)
    summary = GoldenSummary(f"{backend_name} {backend.info.dtype}", [], change,
                            version_changes(golden.get("versions"), installed_versions()),
                            _source(policy, src_cls))
    neox.record(Record("golden-perplexity", backend_name, case.id, change.passed,
                       {"perplexity": ppl, "golden": change.golden, "rel_diff": change.rel_diff,
                        "limit": change.limit, "gpu_class": src_cls}, change.message()))
    if request is not None:
        request.node.user_properties.append(("golden_perplexity", ppl))
    print(summary.text())
    if not change.passed:
        pytest.fail(summary.text(), pytrace=False)
    return change

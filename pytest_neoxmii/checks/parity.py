"""The parity checks an acceptance test runs: fetch outputs through the session (each computed once), compare
them with the parity engine (parity.py), record the verdict for the report, and fail with a readable table."""
from __future__ import annotations

import pytest

from pytest_neoxmii import backends as engines
from pytest_neoxmii import known_issues, parity
from pytest_neoxmii.cases import Case
from pytest_neoxmii.session import NeoxSession, Record


# The session's time breakdown: the judges' own arithmetic (full-vocabulary KL over every position: seconds
# a 2016-token case on two CPU cores), apart from the model calls and from the plugin's overhead.
JUDGING = "judging (teacher-forced metrics)"


def _record_properties(request, metrics: dict) -> None:
    if request is not None:
        for k, v in metrics.items():
            request.node.user_properties.append((k, v))


def mark_known_issue(request, check: str, backend, case: Case) -> str | None:
    """A measured upstream defect under its exact condition: strict xfail, so a fix shows as XPASS(strict).
    Returns the issue's key when the test was marked (for the report's `xfail [key]`), else None."""
    if request is None:        # called outside a test (helpers, unit tests): nothing to mark
        return None
    issue = known_issues.match(check, backend.info, case.plan)
    if issue is None:
        return None
    request.applymarker(pytest.mark.xfail(reason=issue.reason(), strict=True))
    return issue.key


def config_note(neox: NeoxSession, backend_name: str, case: Case, check: str, metrics: dict) -> str:
    """The user's serving config cannot hold this case: the case runs anyway (never quietly enlarged), and the
    verdict carries the reason (message, JUnit property, report). Returns a prefix for the failure message."""
    from pytest_neoxmii.serving_config import misfit
    note = misfit(getattr(neox, "serving_configs", {}).get(backend_name), case.plan, check)
    if note is None:
        return ""
    metrics["config_misfit"] = note
    print(f"NOTE: {note}")
    return f"NOTE: {note}\n"


def check_greedy(neox: NeoxSession, backend_name: str, case: Case, request=None) -> parity.GreedyReport:
    """Greedy ids of the backend against the fp32 HF reference, with the top-k near-tie rule."""
    if not case.plan.generate:
        pytest.skip(f"{case.id} is scored teacher-forced only")
    reference = neox.generation(neox.reference(), case)
    backend = neox.backend(backend_name)
    known = mark_known_issue(request, "greedy", backend, case)
    candidate = neox.generation(backend, case)
    channel = ""
    if getattr(backend, "generations_from_text", False):   # stand-ins and third-party engines may lack it
        reference, dropped = parity.through_text(reference, set(neox.tokenizer.all_special_ids))
        if dropped:
            channel = (f"({dropped} special token(s) of the reference dropped: {backend_name} returns text, "
                       "where they do not appear)\n")
    report = parity.compare_greedy(reference, candidate, neox.options.top_k)
    rows = report.rows
    metrics = {"rows": len(rows), "rows_identical": sum(r.identical for r in rows),
               "first_divergence": min((r.divergence_step for r in rows if r.divergence_step is not None),
                                       default=None)}
    note = config_note(neox, backend_name, case, "greedy", metrics)
    neox.record(Record("greedy", backend_name, case.id, report.passed, metrics, report.summary(), known))
    _record_properties(request, {f"greedy_{k}": v for k, v in metrics.items()})
    print(channel + report.message())
    if not report.passed:
        raise parity.ParityFailure(f"{note}{backend.info.describe()}\n{channel}{report.message()}", report)
    return report


def judged(neox: NeoxSession) -> parity.JudgedOnce:
    """The session's teacher-forced judgments, each computed once per candidate content (parity.JudgedOnce)."""
    return neox.memo(("judged once",), parity.JudgedOnce)


def noise_floor(neox: NeoxSession, case: Case, dtype: str | None = None) -> parity.TFMetrics:
    """HF at `dtype` (default: the session's) against HF fp32 on the same case, computed once per case and
    dtype (every engine's check and the reference's own test use it; on the CPU the 2016-token case's
    metrics take about 9 s each)."""
    peer = neox.backend(engines.reference_name(), dtype) if dtype else neox.peer()

    def compute() -> parity.TFMetrics:
        reference, scores = neox.scores(neox.reference(), case), neox.scores(peer, case)
        with neox.timed(JUDGING):
            return judged(neox).metrics(reference, scores, case.batch, device=neox.device)
    return neox.memo(("noise floor", case.id, peer.info.dtype), compute)


def check_teacher_forced(neox: NeoxSession, backend_name: str, case: Case, request=None) -> parity.ParityVerdict:
    """Teacher-forced logprobs of the backend against fp32 HF, judged against the noise floor (HF's own
    low precision vs fp32 on the same case); on failure, localise the first layer that departs."""
    backend = neox.backend(backend_name)
    known = mark_known_issue(request, "teacher-forced", backend, case)
    floor = noise_floor(neox, case, backend.info.dtype)   # the floor at the precision the backend ran
    reference, scores = neox.scores(neox.reference(), case), neox.scores(backend, case)
    with neox.timed(JUDGING):
        measured = judged(neox).metrics(reference, scores, case.batch, device=neox.device)
    verdict = parity.judge(floor, measured, neox.options.parity_multiple)
    metrics = {"kl_mean": measured.kl_mean, "kl_max": measured.kl_max, "top1_agreement": measured.top1_agreement,
               "max_abs_diff": measured.max_abs_diff, "floor_kl_max": floor.kl_max,
               "perplexity": measured.perplexity_candidate, "multiple": neox.options.parity_multiple}
    note = config_note(neox, backend_name, case, "teacher-forced", metrics)
    neox.record(Record("teacher-forced", backend_name, case.id, verdict.passed, metrics,
                       f"KL max {measured.kl_max:.3g} vs floor {floor.kl_max:.3g}", known))
    _record_properties(request, {f"tf_{k}": v for k, v in metrics.items()})
    print(verdict.message())
    if not verdict.passed:
        message = f"{note}{backend.info.describe()}\n{verdict.message()}\n{localize(neox, backend, case)}"
        raise parity.ParityFailure(message, verdict)
    return verdict


def localize(neox: NeoxSession, backend, case: Case) -> str:
    """Per-layer hooks on both models: the first layer whose output departs beyond the floor."""
    if neox.reference_released_for_memory:
        return ("localisation skipped: the HF reference was released so that the engine fits beside it "
                f"({neox.reference_released_for_memory}), and its per-layer traces are not cached; localise this "
                "case on a GPU that holds both, with --neox-reference-first=never")
    try:
        with neox.timed("model calls"):
            ref = neox.reference().trace(case.batch)
            peer = neox.backend(engines.reference_name(), backend.info.dtype).trace(case.batch)
            cand = backend.trace(case.batch)
        _, mask = case.batch.padded()
        floor = parity.layer_errors(ref, peer, mask)
        report = parity.localize_divergence(ref, cand, mask, floor=floor,
                                            multiple=neox.options.parity_multiple)
        return "localisation (per-layer hidden states vs fp32 HF):\n" + report.message()
    except Exception as exc:   # localisation is a help, never the reason a test errors
        return f"localisation unavailable: {type(exc).__name__}: {exc}"

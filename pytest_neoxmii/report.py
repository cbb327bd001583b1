"""End-of-session report: what ran (per backend), the verdicts per check and case family, the latency table
(backend x metric, ratio to HF, % of the weight-streaming floor, regression-gate verdicts), golden-output
changes, where the time went (kernel build, model load, model calls, timed benchmark calls, the plugin's own
overhead) and, with --neox-report DIR, the JSON summary (neoxmii-summary.json), its Markdown rendering
(summary.md, see markdown_summary.py) and the HF-vs-DS plot (latency-<model>.png). All say which weights
(synthetic seed / real revision) and which GPU the numbers come from."""
from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from pytest_neoxmii.report_tables import (GPU_WORK_LEGEND, has_gpu_work, latency_cells, latency_change, latency_headers,
                                          verdict_rows)
from pytest_neoxmii import ahead_share
from pytest_neoxmii import backends as engines
from pytest_neoxmii.table import format_table

SUMMARY_SCHEMA = "pytest-neoxmii/summary"
SUMMARY_VERSION = 1
SUMMARY_FILE = "neoxmii-summary.json"
MARKDOWN_FILE = "summary.md"


def plot_file(model_name: str) -> str:
    return f"latency-{re.sub(r'[^A-Za-z0-9._-]+', '_', model_name)}.png"


def latency_rows(session) -> list[dict]:
    """The session's latency results as dicts (samples included), in the engines' order (the hf reference
    first), then by batch size."""
    order = {name: i for i, name in enumerate(engines.display_order(r.backend for r in session.latency.values()))}
    results = sorted(session.latency.values(), key=lambda r: (order[r.backend], r.batch_size, r.bench))
    return [r.as_dict() for r in results]


def latency_table(rows: list[dict]) -> str:
    return format_table(latency_headers(rows), latency_cells(rows))


def _empty_counts() -> dict:
    return {"passed": 0, "failed": 0, "xfail": 0, "xpass": 0, "informational": 0, "known_issues": [],
            "outside_config": 0}


def verdicts(session) -> dict[str, dict[str, dict]]:
    """{backend: {check: counts}} over every record of the session. A record under a known issue (strict
    xfail) counts as "xfail" when it failed and "xpass" when it passed (strict: the test fails, the entry
    is stale); "known_issues" lists their keys."""
    out: dict = defaultdict(lambda: defaultdict(_empty_counts))
    for rec in session.records:
        if rec.known_issue:
            key = "xfail" if rec.passed is False else "xpass" if rec.passed else "informational"
        else:
            key = "passed" if rec.passed else "failed" if rec.passed is False else "informational"
        counts = out[rec.backend][rec.check]
        counts[key] += 1
        if rec.metrics.get("config_misfit"):
            counts["outside_config"] += 1
        if rec.known_issue and rec.known_issue not in counts["known_issues"]:
            counts["known_issues"].append(rec.known_issue)
    return {b: dict(c) for b, c in out.items()}


def verdict_table(v: dict) -> str | None:
    table = verdict_rows(v)
    return None if table is None else format_table(*table)


def _finite(value):
    """JSON-safe copy: inf/nan become None, tuples lists, unknown objects their str()."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def build_summary(session) -> dict:
    """The JSON summary: model and weights, GPU, versions, backends, latency (with samples), verdicts,
    golden changes, timings."""
    from pytest_neoxmii.hardware import machine_info
    from pytest_neoxmii.versions import shown_versions

    m = session.model
    wall = time.perf_counter() - session.started
    timings = dict(session.timings)
    rows = latency_rows(session)
    return _finite({
        "schema": SUMMARY_SCHEMA,
        "schema_version": SUMMARY_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": m.spec.name, "hub_id": m.spec.hub_id, "source": m.source, "weights": m.weights_key,
                  "revision": m.revision, "seed": m.seed, "description": m.describe(),
                  "parameters": m.spec.parameter_count()},
        "dtype": session.dtype,
        "dtype_reason": session.dtype_choice.reason,
        "tp": session.options.tp,
        "hardware": {**machine_info(session.hardware), "description": session.hardware.describe(),
                     "memory_in_use_by_others_at_start_bytes": dict(getattr(session, "gpu_memory_in_use", {}))},
        "versions": shown_versions(),
        "backends": {k: info.describe() for k, info in session.infos.items()},
        "kernels": session.kernels.as_json() if getattr(session, "kernels", None) else None,
        "kernel_build": session.kernel_build.describe() if getattr(session, "kernel_build", None) else None,
        "unavailable": dict(session.unavailable),
        "known_issue_not_deployed": dict(session.known_blocked),
        "crashed": dict(session.crashed),
        "reference_first": list(getattr(session, "reference_releases", [])),
        "latency": rows,
        "verdicts": verdicts(session),
        "configs": {engine: c.as_json() for engine, c in getattr(session, "serving_configs", {}).items()},
        "config_warnings": [f"{r.check} {r.backend} {r.case}: {r.metrics['config_misfit']}"
                            for r in session.records if r.metrics.get("config_misfit")],
        "golden_changes": [{"backend": r.backend, "case": r.case, "check": r.check, "summary": r.summary}
                           for r in session.records
                           if (r.check.startswith("golden") and r.passed is False)
                           or (r.check == "golden" and r.metrics.get("status") == "near-tie")],
        # verdict: the wall clock's; gpu_work_verdict: --neox-gpu-work's; change: both in words
        "latency_changes": [{"backend": r.backend, "bench": r.case, "verdict": r.metrics.get("gate_verdict"),
                             "gpu_work_verdict": r.metrics.get("gpu_work_verdict"),
                             "change": latency_change(r.metrics), "summary": r.summary} for r in session.records
                            if r.check == "latency" and latency_change(r.metrics)],
        "records": [{"check": r.check, "backend": r.backend, "case": r.case, "passed": r.passed,
                     "known_issue": r.known_issue, "metrics": r.metrics, "summary": r.summary}
                    for r in session.records],
        "timings_s": {**timings, "other (plugin and pytest)": max(wall - sum(timings.values()), 0.0),
                      "session": wall},
        "other_s": session.overhead.as_dict() if getattr(session, "overhead", None) else None,
        "timeline_s": session.overhead.timeline() if getattr(session, "overhead", None) else [],
        "test_phases_s": session.overhead.phases if getattr(session, "overhead", None) else {},
        "prelaunched": list(session.prelaunched),
        "engines_one_at_a_time": getattr(session, "engines_one_at_a_time", None),   # why none was prelaunched
        "engines_took_turns": list(getattr(session, "turns", [])),     # closed so that another fits the GPU
        "ended_before_teardown": session.ended_on_their_own() if hasattr(session, "ended_on_their_own") else [],
        "reference_computed_while_workers_loaded": session.reference_ahead,
        "reference_computed_s": round(getattr(session, "reference_ahead_s", 0.0), 3),
        "redeployed": list(session.redeployed),
        "worked_ahead": ahead_share.in_report_order(session.ahead_reports),
        "plot": plot_file(m.spec.name) if rows else None,
    })


def write_report(session, directory: Path) -> tuple[Path, Path | None, str | None]:
    """Write neoxmii-summary.json, summary.md (also appended to $GITHUB_STEP_SUMMARY inside GitHub Actions)
    and, when there are latency results, latency-<model>.png.
    Returns (json path, png path or None, why there is no png or None)."""
    from pytest_neoxmii.markdown_summary import write_markdown
    from pytest_neoxmii.plot import plot_summary

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    summary = build_summary(session)
    png, why = None, None
    if summary["plot"]:
        try:
            png = plot_summary(summary, directory / summary["plot"])
        except Exception as exc:   # a plotting problem must not hide the numbers
            why = f"plot failed: {type(exc).__name__}: {exc}"
            summary["plot"] = None
    else:
        why = "no latency results in this session"
    path = directory / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    write_markdown(summary, directory / MARKDOWN_FILE)
    return path, png, why


def terminal_summary(terminalreporter, session) -> None:
    tr = terminalreporter
    tr.section("neoxmii summary")
    tr.write_line(f"model: {session.model.describe()}; GPUs: {session.hardware.describe()}")
    tr.write_line(f"dtype: {session.dtype_choice.describe()}")
    for key, info in session.infos.items():
        tr.write_line(f"ran  {key:<10} {info.describe()}")
    for key, reason in session.unavailable.items():
        tr.write_line(f"skip {key:<10} {reason}")
    for config in getattr(session, "serving_configs", {}).values():
        tr.write_line(config.describe())
    for key, reason in session.known_blocked.items():
        tr.write_line(f"xfail {key:<9} not deployed: {reason}")
    for key, reason in session.crashed.items():
        tr.write_line(f"CRASH {key:<9} {reason.splitlines()[0]}", red=True)
    for line in getattr(session, "reference_releases", []):
        tr.write_line(line)
    groups = defaultdict(lambda: [0, 0, 0])
    for rec in session.records:
        family = rec.case.split("-b")[0] if "-b" in rec.case else rec.case
        g = groups[(rec.backend, rec.check, family)]
        g[0 if rec.passed else 1 if rec.passed is False else 2] += 1
    if groups:
        order = {b: i for i, b in enumerate(engines.display_order(b for b, _, _ in groups))}
        rows = [[b, c, f, p, fl] for (b, c, f), (p, fl, _) in sorted(groups.items(),
                                                                      key=lambda g: (order[g[0][0]], g[0]))]
        tr.write_line(format_table(["backend", "check", "case family", "passed", "failed"], rows))
    _latency_section(tr, session)
    wall = time.perf_counter() - session.started
    t = session.timings
    accounted = sum(t.values())
    tr.write_line("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items())
                  + f", other (plugin and pytest) {max(wall - accounted, 0):.1f} s, session {wall:.1f} s")
    if getattr(session, "overhead", None) is not None:
        tr.write_line(session.overhead.describe())
    if session.prelaunched:
        tr.write_line(f"workers launched when the session started, loading side by side: "
                      f"{', '.join(session.prelaunched)} (model load above is the time tests waited for them)"
                      + (f"; meanwhile the reference's outputs of {session.reference_ahead} cases were computed"
                         f" ({getattr(session, 'reference_ahead_s', 0.0):.1f} s, its load included)"
                         if session.reference_ahead else ""))
    if getattr(session, "engines_one_at_a_time", None):
        tr.write_line(session.engines_one_at_a_time)
    for line in getattr(session, "turns", []):
        tr.write_line(f"took turns: {line}")
    for line in session.ended_on_their_own() if hasattr(session, "ended_on_their_own") else ():
        tr.write_line(line, red=True)
    if getattr(session, "kernel_build", None) is not None:
        tr.write_line(session.kernel_build.describe())
    for line in session.redeployed:
        tr.write_line(line)
    if session.ahead_reports:
        tr.write_line("worked ahead, side by side: " + ", ".join(
            f"{key.split(':')[0]} {r['computed']}/{r['calls']} calls in {r['seconds']:.1f} s"
            + (f" ({r['unclaimed']} never asked for: tests that did not run, or did not get that far)"
               if r["unclaimed"] else "")
            + (f" on {r['threads']} thread{'s' if r['threads'] != 1 else ''}" if r.get("threads") else "")
            + ("" if r.get("finished", True) else " (still working ahead when the session ended)")
            for key, r in ahead_share.in_report_order(session.ahead_reports).items()))
    if session.options.report_dir is not None:
        try:
            path, png, why = write_report(session, session.options.report_dir)
            tr.write_line(f"report: {path}, {path.with_name(MARKDOWN_FILE)}"
                          + (f", plot {png}" if png else f" (no plot: {why})"))
        except OSError as exc:
            tr.write_line(f"report not written to {session.options.report_dir}: {exc}")


def _latency_section(tr, session) -> None:
    rows = latency_rows(session)
    if rows:
        gpu = session.hardware.gpus[0].name if session.hardware.gpus else "CPU"
        tr.write_line(f"latency ({session.model.describe()}, on {gpu}; +-CI %: half-width of the 95% confidence "
                      f"interval of the end-to-end median; rounds: measured rounds/why they stopped (ci: interval "
                      f"within target, box: time box, max: round limit); x/HF: median end-to-end over the HF "
                      f"peer's in this session; floor %: weight-streaming floor / TPOT"
                      + (f"; {GPU_WORK_LEGEND}" if has_gpu_work(rows) else "") + "):")
        tr.write_line(latency_table(rows))
    v = verdicts(session)
    table = verdict_table(v)
    if table:
        tr.write_line("verdicts per backend:")
        tr.write_line(table)
    for rec in session.records:
        change = latency_change(rec.metrics) if rec.check == "latency" else None
        if change:
            tr.write_line(f"{change}: {rec.summary}")
    changed = [rec for rec in session.records if rec.check.startswith("golden") and rec.passed is False]
    near = [rec for rec in session.records if rec.check == "golden" and rec.metrics.get("status") == "near-tie"]
    for rec in changed:
        tr.write_line(f"golden changed: {rec.backend} {rec.summary}")
    for rec in near:
        tr.write_line(f"golden near-tie (accepted): {rec.backend} {rec.summary}")
    for rec in session.records:
        if rec.metrics.get("config_misfit"):
            tr.write_line(f"outside the serving config: {rec.check} {rec.backend} {rec.case}: "
                          f"{rec.metrics['config_misfit']}", yellow=True)

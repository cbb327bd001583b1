"""How the latency gate judges a machine against itself: sessions of the same code on the same machine,
each taken as the baseline of each other one.

    python -m pytest_neoxmii.gate_between_sessions REPORT REPORT [REPORT ...] [--threshold 0.10]

REPORT: a session's neoxmii-summary.json (--neox-report DIR writes DIR/neoxmii-summary.json), or a directory
holding one. Every figure the reports share (backend, dtype, shape) is compared, for every ordered pair of
reports, with the gate itself (stats.compare_latency on the kept rounds, as a stored baseline would be). With
nothing changed between the sessions, each "regression" is a false alarm the gate would raise on this machine.

The gate's samples are one session's rounds, so it cannot tell a regression from a shift of the whole session
(the host's speed, where a process's memory landed). This prints how often such shifts trip the gate at
--threshold, and the smallest threshold under which no comparison would have failed: the figure to give
--neox-latency-threshold on such a machine (or a reason to record the baselines on a steadier one).

Reports of sessions run with --neox-gpu-work also hold each figure's GPU work per call: those are judged the
same way, pair by pair, with the GPU work gate (gpu_work.py), which is what the flag is for: on one H200 VM
the wall clock failed 5 of 8 tests between two sessions a minute apart, and the GPU work none."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from pytest_neoxmii import gpu_work
from pytest_neoxmii.stats import MIN_SAMPLES, compare_latency


class Unusable(Exception):
    pass


def load_session(path: Path):
    """(the report's file, {(backend, dtype, bench): its end-to-end rounds in seconds},
    {(backend, dtype, bench): its gpu_work.GpuWork, where the session measured it})."""
    file = path / "neoxmii-summary.json" if path.is_dir() else path
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise Unusable(f"cannot read {file}: {exc}") from None
    figures, work = {}, {}
    for f in (summary.get("latency") if isinstance(summary, dict) else None) or []:
        samples = f.get("e2e_samples_s") if isinstance(f, dict) else None
        if not samples:
            continue
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in samples):
            raise Unusable(f"{file}: the {f.get('backend', '?')} {f.get('bench', '?')} figure's rounds are not all "
                           f"positive numbers of seconds")
        key = (str(f.get("backend")), str(f.get("dtype")), str(f.get("bench")))
        figures[key] = list(samples)
        measured = gpu_work.from_metrics(f)
        if measured is not None:
            work[key] = measured
    if not figures:
        raise Unusable(f"{file} has no latency figure with its rounds (no latency test ran)")
    return str(file), figures, work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="the gate's relative slowdown, as --neox-latency-threshold (default 0.10)")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 10:
        parser.error("--threshold is a fraction of the median such as 0.1")
    sessions = []
    for report in args.reports:
        try:
            sessions.append(load_session(report))
        except Unusable as exc:
            print(f"gate_between_sessions: skipped: {exc}", file=sys.stderr)
    if len(sessions) < 2:
        print("gate_between_sessions: needs two usable reports", file=sys.stderr)
        return 2
    for i, (name, _, _) in enumerate(sessions, 1):
        print(f"session {i}: {name}")
    compared, alarms, needed, pairs, failing_pairs = 0, [], 0.0, 0, 0
    work_compared, work_alarms, work_largest = 0, [], 0.0
    for (i, (_, base, base_work)), (j, (_, current, current_work)) in itertools.permutations(
            enumerate(sessions, 1), 2):
        pairs += 1
        before = len(alarms)
        for key in sorted(base_work.keys() & current_work.keys()):
            judged = gpu_work.compare(base_work[key], current_work[key])
            work_compared += 1
            work_largest = max([work_largest, *(abs(c) for c in judged.changes.values())])
            if judged.failed:
                work_alarms.append(f"  baseline session {i}, current session {j}: {key[0]} {key[1]} {key[2]}: "
                                   f"{judged.message()}")
        for key in sorted(base.keys() & current.keys()):
            if min(len(base[key]), len(current[key])) < MIN_SAMPLES:
                continue
            cmp = compare_latency(base[key], current[key], threshold=args.threshold)
            compared += 1
            if cmp.ratio > 1 and cmp.p_value is not None and cmp.p_value < cmp.alpha and cmp.outside_baseline_ci:
                # significant and outside the baseline's interval: only the threshold stands in its way
                needed = max(needed, cmp.ratio - 1)
            if cmp.failed:
                alarms.append(f"  baseline session {i}, current session {j}: {key[0]} {key[1]} {key[2]}: "
                              f"{cmp.message()}")
        failing_pairs += len(alarms) > before
    if not compared:
        print("gate_between_sessions: the reports share no figure with enough rounds to compare", file=sys.stderr)
        return 2
    print(f"{compared} comparisons (each session the baseline of each other one): {len(alarms)} would fail the "
          f"gate at a threshold of {args.threshold:g}")
    print("\n".join(alarms) if alarms else "  none")
    print(f"{failing_pairs} of {pairs} ordered pairs of sessions: at least one latency test would fail")
    print(f"smallest threshold under which none fails: {needed:.2f}" if needed else
          "no comparison was a significant slowdown outside the baseline's interval")
    if work_compared:
        print(f"GPU work per call (--neox-gpu-work): {work_compared} comparisons, {len(work_alarms)} would fail at "
              f"{gpu_work.GPU_WORK_THRESHOLD:.0%}; the largest change of either figure: {work_largest:.1%}")
        print("\n".join(work_alarms) if work_alarms else "  none")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a shorter latency time box would have given, replayed on figures already measured.

    python scripts/time_box_whatif.py REPORT [REPORT ...] [--box 3 4 5]

REPORT: a session's neoxmii-summary.json (--neox-report DIR writes DIR/neoxmii-summary.json), or a directory
holding one. For each timed figure the summary keeps every measured round in order (end-to-end and prefill
samples), how many warm-up rounds ran and how long the timing took. The session's own stop rule
(latency.StopRule: the gate's minimum rounds, the +-2 % interval target, the box counted from the start of the
warm-up) is applied again to those rounds with each box, so a shorter box is exactly the rounds the rule would
have kept, the same samples, and the interval is the plugin's own (samples.median_ci). Seconds are the warm-up
(the figure's timing less its rounds) plus the kept rounds.

A box longer than the one the session ran cannot be replayed past its last round: such a figure is marked
'+' (its rounds ran out before the longer box did). Use it to choose --neox-latency-time-box for a runner
from that runner's own reports; docs/SPEED.md (the sixteenth round) has it on one H200."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from pytest_neoxmii.latency import GPU_PROFILE, StopRule
from pytest_neoxmii.samples import median_ci


@dataclass
class Replay:
    rounds: int
    reason: str
    seconds: float
    half_width_pct: float | None
    ran_out: bool            # the recorded rounds ended before this box's rule stopped


def replay(e2e: list[float], prefill: list[float], timing_s: float, rule: StopRule) -> Replay:
    """The recorded rounds under `rule`, in the order they ran."""
    warmup_s = max(timing_s - sum(e2e) - sum(prefill[:len(e2e)]), 0.0)
    elapsed, reason, n = warmup_s, None, 0
    for n in range(1, len(e2e) + 1):
        elapsed += e2e[n - 1] + (prefill[n - 1] if n - 1 < len(prefill) else 0.0)
        reason = rule.reason_to_stop(e2e[:n], elapsed)
        if reason:
            break
    ci = median_ci(e2e[:n])
    return Replay(n, reason or "ran out", elapsed, None if ci is None else 100 * ci.half_width_rel,
                  ran_out=reason is None)


def load_figures(path: Path) -> tuple[str, list[dict]]:
    """The timed figures of one report, each with its rounds; a report it cannot use is one line why."""
    file = path / "neoxmii-summary.json" if path.is_dir() else path
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise Unusable(f"cannot read {file}: {exc}") from None
    latency = summary.get("latency") if isinstance(summary, dict) else None
    figures = [f for f in latency or [] if isinstance(f, dict) and f.get("e2e_samples_s")
               and f.get("timing_s") is not None and f.get("stop_reason") != "fixed"]
    for f in figures:
        numbers = [f["timing_s"], *f["e2e_samples_s"], *(f.get("prefill_samples_s") or [])]
        if not all(isinstance(x, (int, float)) and x >= 0 for x in numbers):
            raise Unusable(f"{file}: the {f.get('backend', '?')} bs{f.get('batch_size', '?')} figure's rounds or "
                           f"seconds are not all numbers of seconds")
    if not figures:
        raise Unusable(f"{file} has no figure timed with the adaptive rule and its rounds kept (no latency test "
                       f"ran, or all ran a fixed round count)")
    return str(file), figures


class Unusable(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--box", nargs="+", type=float, default=[3.0, 4.0, 5.0], help="time boxes, seconds")
    parser.add_argument("--ci", type=float, default=GPU_PROFILE.target_ci * 100, help="interval target, %%")
    parser.add_argument("--min-rounds", type=int, default=GPU_PROFILE.min_rounds)
    args = parser.parse_args(argv)
    if any(not b > 0 for b in args.box) or not args.ci > 0:
        parser.error("--box and --ci must be positive numbers")
    if not 1 <= args.min_rounds <= GPU_PROFILE.max_rounds:
        parser.error(f"--min-rounds must be between 1 and the rule's round limit, {GPU_PROFILE.max_rounds}")

    totals = {box: [] for box in args.box}
    widths = {box: [] for box in args.box}
    recorded_total = []
    for report in args.reports:
        try:
            name, figures = load_figures(report)
        except Unusable as exc:
            print(f"time_box_whatif: skipped: {exc}", file=sys.stderr)
            continue
        print(f"{name}")
        print(f"  {'figure':<10} {'recorded':>26} " + " ".join(f"{f'box {b:g} s':>26}" for b in args.box))
        session = {box: 0.0 for box in args.box}
        recorded = 0.0
        for f in figures:
            e2e, prefill = f["e2e_samples_s"], f.get("prefill_samples_s") or []
            recorded += f["timing_s"]
            hw = f.get("e2e_ci_half_width_pct")
            cells = [f"{len(e2e):>3}r {f.get('stop_reason', '?'):<8} {f['timing_s']:4.1f}s "
                     f"{'+-%.1f%%' % hw if hw is not None else '-':>7}"]
            for box in args.box:
                rule = StopRule(args.min_rounds, GPU_PROFILE.max_rounds, box, args.ci / 100)
                r = replay(e2e, prefill, f["timing_s"], rule)
                session[box] += r.seconds
                if r.half_width_pct is not None:
                    widths[box].append(r.half_width_pct)
                mark = "+" if r.ran_out else " "
                cells.append(f"{r.rounds:>3}r {r.reason:<8} {r.seconds:4.1f}s{mark}"
                             f"{'+-%.1f%%' % r.half_width_pct if r.half_width_pct is not None else '-':>7}")
            label = f"{f.get('backend', '?')} bs{f.get('batch_size', '?')}"
            print(f"  {label:<10} " + " ".join(f"{c:>26}" for c in cells))
        print(f"  {'timed':<10} {recorded:>25.1f}s " + " ".join(f"{session[b]:>25.1f}s" for b in args.box))
        recorded_total.append(recorded)
        for box in args.box:
            totals[box].append(session[box])
    if not recorded_total:
        print("time_box_whatif: no report had timed figures to replay", file=sys.stderr)
        return 2
    print(f"{len(recorded_total)} reports: timed seconds (sum over figures), the figures' +-CI %")
    print(f"  recorded {sum(recorded_total):.1f} s")
    for box in args.box:
        med = statistics.median(widths[box]) if widths[box] else float("nan")
        worst = max(widths[box]) if widths[box] else float("nan")
        saved = [t - r for t, r in zip(totals[box], recorded_total)]
        print(f"  box {box:g} s: {sum(totals[box]):.1f} s ({sum(saved):+.1f} s; per session {min(saved):+.1f} to "
              f"{max(saved):+.1f} s), +-CI median {med:.1f} %, worst {worst:.1f} %, "
              f"within {args.ci:g} %: {sum(w <= args.ci for w in widths[box])} of {len(widths[box])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

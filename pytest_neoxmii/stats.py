"""Latency summaries and the latency regression gate.

The gate fails a benchmark only when the slowdown is both *large* (the median moved by more than a relative
threshold) and *real* (a one-sided Mann-Whitney U test on the raw samples says it is unlikely to be noise).
Either condition alone is a poor gate: a threshold on the median alone fires on noisy machines, a significance
test alone fires on tiny but consistent changes that nobody cares about.

Only numpy is used at runtime (no scipy): the U test uses the normal approximation with tie and continuity
correction, which matches scipy.stats.mannwhitneyu(..., method="asymptotic") and is accurate for the sample
counts pytest-benchmark produces (tens of rounds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# Below this many samples on either side the test has too little power to mean anything; such comparisons
# are reported and never fail.
MIN_SAMPLES = 5

VERDICTS = ("regression", "improvement", "unchanged", "insufficient-samples")


def _as_samples(samples: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(list(samples), dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a flat list of latencies in seconds")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: latencies must be finite numbers")
    return arr


def summarize(samples: Sequence[float]) -> dict:
    """Summary of latency samples (seconds). Plain Python numbers, so the result can go straight into JSON.

    stddev is the sample standard deviation (ddof=1; 0.0 for a single sample); percentiles use numpy's
    default linear interpolation; iqr = p75 - p25."""
    arr = _as_samples(samples, "summarize")
    if arr.size == 0:
        raise ValueError("summarize: no samples")
    p25, p50, p75, p90, p99 = np.percentile(arr, [25, 50, 75, 90, 99])
    return {
        "n": int(arr.size),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
        "stddev": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "median": float(p50),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "iqr": float(p75 - p25),
    }


def _rank_with_ties(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks, tied values sharing their average rank; also the size of every tie group."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    counts = np.diff(np.r_[starts, values.size])
    # Average of ranks start+1 .. start+count.
    avg_rank = starts + (counts + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, counts)
    return ranks, counts


def mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided Mann-Whitney U p-value for "x tends to be larger than y".

    Normal approximation with tie correction and continuity correction (same as scipy's
    mannwhitneyu(x, y, alternative="greater", method="asymptotic")). Returns 1.0 when every value is equal
    (no evidence of a shift either way)."""
    xa = _as_samples(x, "mann_whitney_greater x")
    ya = _as_samples(y, "mann_whitney_greater y")
    n1, n2 = xa.size, ya.size
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney_greater: both samples must be non-empty")
    ranks, ties = _rank_with_ties(np.concatenate([xa, ya]))
    n = n1 + n2
    u1 = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    mu = n1 * n2 / 2.0
    tie_term = float((ties.astype(np.float64) ** 3 - ties).sum()) / (n * (n - 1))
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if var <= 0.0:
        return 1.0
    # Continuity correction: U is discrete, so move half a step toward the null.
    z = (u1 - mu - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2.0))  # upper tail of the standard normal


def _fmt_seconds(s: float) -> str:
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_p(p: float) -> str:
    # Two significant digits without drowning small values in zeros: 0.0003, 0.042, 1.2e-09.
    return f"{p:.2g}"


@dataclass(frozen=True)
class LatencyComparison:
    """Result of compare_latency.

    p_value is the one-sided Mann-Whitney p-value in the direction the median moved (slower -> "current is
    larger", faster -> "current is smaller"); None when there were too few samples to test."""

    baseline_median: float
    current_median: float
    ratio: float
    change_pct: float
    p_value: Optional[float]
    threshold: float
    alpha: float
    verdict: str
    n_baseline: int = 0
    n_current: int = 0

    @property
    def failed(self) -> bool:
        return self.verdict == "regression"

    def message(self) -> str:
        """One readable line, e.g. 'median 12.31 ms -> 14.20 ms (+15.4%, threshold 10%), Mann-Whitney
        p=0.0003 < 0.01: regression'."""
        head = (
            f"median {_fmt_seconds(self.baseline_median)} -> {_fmt_seconds(self.current_median)} "
            f"({self.change_pct:+.1f}%, threshold {self.threshold * 100:g}%)"
        )
        if self.verdict == "insufficient-samples":
            return (
                f"{head}, {self.n_baseline} baseline / {self.n_current} current samples "
                f"(need >= {MIN_SAMPLES} each): insufficient-samples, not compared"
            )
        cmp = "<" if self.p_value < self.alpha else ">="
        return f"{head}, Mann-Whitney p={_fmt_p(self.p_value)} {cmp} {self.alpha:g}: {self.verdict}"


def compare_latency(
    baseline: Sequence[float],
    current: Sequence[float],
    threshold: float = 0.10,
    alpha: float = 0.01,
) -> LatencyComparison:
    """Compare current latency samples against the baseline ones (seconds).

    regression:  median slower by more than `threshold` (current/baseline > 1 + threshold) AND one-sided
                 Mann-Whitney p < alpha for "current is slower". The only verdict that fails.
    improvement: median faster by more than `threshold` (current/baseline < 1 - threshold) AND p < alpha for
                 "current is faster".
    insufficient-samples: fewer than MIN_SAMPLES on either side (never fails).
    unchanged:   anything else (small change, or a large change the samples cannot distinguish from noise).
    """
    if not threshold >= 0:
        raise ValueError(f"compare_latency: threshold must be >= 0, got {threshold!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"compare_latency: alpha must be in (0, 1), got {alpha!r}")
    base = _as_samples(baseline, "compare_latency baseline")
    cur = _as_samples(current, "compare_latency current")

    base_med = float(np.median(base)) if base.size else math.nan
    cur_med = float(np.median(cur)) if cur.size else math.nan
    if base_med > 0:
        ratio = cur_med / base_med
    else:  # a zero baseline median cannot be scaled; only "no change" is meaningful
        ratio = 1.0 if cur_med == base_med else math.inf
    change_pct = (ratio - 1.0) * 100.0

    common = dict(
        baseline_median=base_med,
        current_median=cur_med,
        ratio=ratio,
        change_pct=change_pct,
        threshold=threshold,
        alpha=alpha,
        n_baseline=int(base.size),
        n_current=int(cur.size),
    )
    if base.size < MIN_SAMPLES or cur.size < MIN_SAMPLES:
        return LatencyComparison(p_value=None, verdict="insufficient-samples", **common)

    if ratio >= 1.0:
        p = mann_whitney_greater(cur, base)
        verdict = "regression" if (ratio > 1.0 + threshold and p < alpha) else "unchanged"
    else:
        p = mann_whitney_greater(base, cur)
        verdict = "improvement" if (ratio < 1.0 - threshold and p < alpha) else "unchanged"
    return LatencyComparison(p_value=p, verdict=verdict, **common)

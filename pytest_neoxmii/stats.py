"""The latency regression gate.

The gate fails a benchmark only when the slowdown is *large* (the median moved by more than a relative
threshold), *real* (a one-sided Mann-Whitney U test on the raw samples says it is unlikely to be noise) and
*outside the baseline's own uncertainty* (the current median lies beyond the 95 % confidence interval of the
baseline's median, samples.median_ci). A threshold on the median alone fires on noisy machines, a significance
test alone fires on tiny but consistent changes that nobody cares about, and the interval keeps a baseline
whose own median is uncertain by more than the threshold from calling a move inside that uncertainty a
regression. Improvements are judged by the mirror rule.

The U test is scipy.stats.mannwhitneyu: method="exact" when the pooled samples have no ties and the smaller
side has at most EXACT_MAX_N samples (scipy's own "auto" rule, stated here so that it cannot move under us:
there the normal approximation is poor, and the exact null distribution is cheap), else "asymptotic" (normal
approximation with tie and continuity correction; the exact distribution does not hold under ties, and
building it for two samples of 20-50 costs milliseconds per comparison for a p-value that differs from the
approximation in the third digit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from pytest_neoxmii.samples import MEDIAN_CI_CONFIDENCE, MedianCI, as_samples, median_ci, summarize  # noqa: F401

# Below this many samples on either side the comparison is reported and never fails: 6 is the fewest whose
# median has a 95 % distribution-free confidence interval (samples.median_ci_rank), which the gate needs.
MIN_SAMPLES = 6

# The exact U distribution when the smaller sample has at most this many (and nothing is tied).
EXACT_MAX_N = 8

VERDICTS = ("regression", "improvement", "unchanged", "insufficient-samples")

def mann_whitney_method(x: np.ndarray, y: np.ndarray) -> str:
    """"exact" for tie-free samples whose smaller side has at most EXACT_MAX_N, else "asymptotic"."""
    pooled = np.concatenate([x, y])
    ties = np.unique(pooled).size < pooled.size
    return "exact" if not ties and min(x.size, y.size) <= EXACT_MAX_N else "asymptotic"


def mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided Mann-Whitney U p-value for "x tends to be larger than y" (scipy.stats.mannwhitneyu,
    alternative="greater", method as mann_whitney_method says). 1.0 when every value is equal (no evidence
    of a shift either way)."""
    xa = as_samples(x, "mann_whitney_greater x")
    ya = as_samples(y, "mann_whitney_greater y")
    if xa.size == 0 or ya.size == 0:
        raise ValueError("mann_whitney_greater: both samples must be non-empty")
    if np.all(np.concatenate([xa, ya]) == xa[0]):
        return 1.0
    from scipy.stats import mannwhitneyu    # here, not at import: 1.1 s that a session without a gate never needs
    p = float(mannwhitneyu(xa, ya, alternative="greater", method=mann_whitney_method(xa, ya)).pvalue)
    return 1.0 if math.isnan(p) else p


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
    larger", faster -> "current is smaller"); None when there were too few samples to test. baseline_ci and
    current_ci are the 95 % confidence intervals of the two medians (None below MIN_SAMPLES)."""

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
    baseline_ci: Optional[MedianCI] = None
    current_ci: Optional[MedianCI] = None

    @property
    def failed(self) -> bool:
        return self.verdict == "regression"

    @property
    def outside_baseline_ci(self) -> Optional[bool]:
        """Whether the current median lies beyond the baseline median's confidence interval, on the side it
        moved to (None without an interval)."""
        ci = self.baseline_ci
        if ci is None:
            return None
        return self.current_median > ci.high if self.ratio >= 1.0 else self.current_median < ci.low

    def message(self) -> str:
        """One readable line, e.g. 'median 12.31 ms -> 14.20 ms (+15.4%, threshold 10%), Mann-Whitney
        p=0.0003 < 0.01, outside the baseline's 95% CI [12.21 ms, 12.41 ms]: regression'."""
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
        ci = self.baseline_ci
        where = "outside" if self.outside_baseline_ci else "inside"
        return (f"{head}, Mann-Whitney p={_fmt_p(self.p_value)} {cmp} {self.alpha:g}, {where} the baseline's "
                f"{MEDIAN_CI_CONFIDENCE * 100:g}% CI [{_fmt_seconds(ci.low)}, {_fmt_seconds(ci.high)}]: {self.verdict}")


def compare_latency(
    baseline: Sequence[float],
    current: Sequence[float],
    threshold: float = 0.10,
    alpha: float = 0.01,
) -> LatencyComparison:
    """Compare current latency samples against the baseline ones (seconds).

    regression:  median slower by more than `threshold` (current/baseline > 1 + threshold) AND one-sided
                 Mann-Whitney p < alpha for "current is slower" AND the current median above the upper end
                 of the baseline median's 95 % confidence interval. The only verdict that fails.
    improvement: the mirror image: faster by more than `threshold`, p < alpha for "current is faster", and
                 the current median below the lower end of the baseline median's interval.
    insufficient-samples: fewer than MIN_SAMPLES on either side (never fails).
    unchanged:   anything else (small change, or a large change the samples cannot distinguish from noise).
    """
    if not threshold >= 0:
        raise ValueError(f"compare_latency: threshold must be >= 0, got {threshold!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"compare_latency: alpha must be in (0, 1), got {alpha!r}")
    base = as_samples(baseline, "compare_latency baseline")
    cur = as_samples(current, "compare_latency current")

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

    base_ci, cur_ci = median_ci(base), median_ci(cur)
    if ratio >= 1.0:
        p = mann_whitney_greater(cur, base)
        verdict = ("regression" if ratio > 1.0 + threshold and p < alpha and cur_med > base_ci.high
                   else "unchanged")
    else:
        p = mann_whitney_greater(base, cur)
        verdict = ("improvement" if ratio < 1.0 - threshold and p < alpha and cur_med < base_ci.low
                   else "unchanged")
    return LatencyComparison(p_value=p, verdict=verdict, baseline_ci=base_ci, current_ci=cur_ci, **common)

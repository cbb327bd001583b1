"""Descriptive statistics of latency samples: the summary stored with a baseline and shown in the report, and
the distribution-free confidence interval of the median that adaptive timing stops on and the gate reads.

It imports nothing of this package, so every layer may use it: the baseline store (storage/) fills in an
entry's "stats" with summarize(), the regression gate (stats.py) and the timing loop (latency.py) read
median_ci().
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

MEDIAN_CI_CONFIDENCE = 0.95


def as_samples(samples: Sequence[float], what: str) -> np.ndarray:
    """A flat float64 array of finite latencies, else ValueError naming `what`."""
    arr = np.asarray(list(samples), dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a flat list of latencies in seconds")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: latencies must be finite numbers")
    return arr


@dataclass(frozen=True)
class MedianCI:
    """[low, high] covers the population median with probability >= `coverage` (exact, not asymptotic)."""
    low: float
    high: float
    median: float
    coverage: float
    rank: int          # low is the rank-th smallest sample, high the rank-th largest (1-based)

    @property
    def half_width_rel(self) -> float:
        """Half the interval's width over the median (0.02 = +-2 %); inf for a zero median."""
        width = self.high - self.low
        return width / (2.0 * self.median) if self.median > 0 else (0.0 if width == 0 else float("inf"))


HALF = Fraction(1, 2)


@functools.lru_cache(maxsize=8)      # the timing loop asks for n, then n + 1, ...: each n once
def _weights_up_to(n: int, p: Fraction) -> tuple[int, ...]:
    """d**n P(B <= k) for k = 0..n, B ~ Binomial(n, p = a/d): the cumulative sums of C(n, i) a**i (d-a)**(n-i),
    integers, each coefficient from the last (C(n, i + 1) = C(n, i) (n - i) / (i + 1), exact)."""
    a, b = p.numerator, p.denominator - p.numerator
    b_powers = [1]
    for _ in range(n):
        b_powers.append(b_powers[-1] * b)
    sums, coefficient, a_power, total = [], 1, 1, 0
    for i in range(n + 1):
        total += coefficient * a_power * b_powers[n - i]
        sums.append(total)
        coefficient = coefficient * (n - i) // (i + 1)
        a_power *= a
    return tuple(sums)


def binomial_cdf(k: int, n: int, p: Fraction = HALF) -> float:
    """P(B <= k) for B ~ Binomial(n, p), p rational, exactly: integers throughout, rounded once to a float.
    Not scipy.stats: importing it took 1.1 s of every process that times or collects on a 2-core EPYC
    (docs/SPEED.md, the thirtieth round), for sums of binomial coefficients."""
    p = Fraction(p)
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return _weights_up_to(n, p)[k] / p.denominator ** n


def binomial_at_least(k: int, n: int, p: Fraction) -> float:
    """P(B >= k) for B ~ Binomial(n, p), exactly (the complement taken in integers, so a tail near 0 keeps its
    digits): the p-value of a one-sided binomial test that the rate is above p."""
    p = Fraction(p)
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    whole = p.denominator ** n
    return (whole - _weights_up_to(n, p)[k - 1]) / whole


def _binomial_ppf(q: float, n: int, p: Fraction = HALF) -> int:
    """The smallest k with P(B <= k) >= q (as scipy's binom.ppf)."""
    return next(k for k in range(n + 1) if binomial_cdf(k, n, p) >= q)


@functools.lru_cache(maxsize=None)   # a few hundred distinct n at most
def median_ci_rank(n: int, confidence: float = MEDIAN_CI_CONFIDENCE) -> Optional[int]:
    """The largest rank j such that [x_(j), x_(n+1-j)] covers the median with probability >= confidence, or
    None when even [min, max] does not (n < 6 at 95 %).

    The number of samples below the median is Binomial(n, 1/2), so the interval misses the median with
    probability 2 * P(B <= j - 1); j is the largest rank keeping that <= 1 - confidence."""
    if not 0 < confidence < 1:
        raise ValueError(f"median CI confidence must be in (0, 1), got {confidence!r}")
    tail = (1.0 - confidence) / 2.0
    if n < 1 or binomial_cdf(0, n) > tail:
        return None
    # The ppf of tail is the smallest q with P(B <= q) >= tail; the rank is q, or q + 1 when P(B <= q) hits
    # tail exactly (then x_(q+1) still keeps the miss probability at the bound).
    q = _binomial_ppf(tail, n)
    j = q + 1 if binomial_cdf(q, n) <= tail else q
    return min(j, (n + 1) // 2)


def median_ci(samples: Sequence[float], confidence: float = MEDIAN_CI_CONFIDENCE) -> Optional[MedianCI]:
    """The distribution-free confidence interval of the median from order statistics (no normality assumed,
    robust to the slow outliers latency samples have); None when there are too few samples for it."""
    arr = np.sort(as_samples(samples, "median_ci"))
    n = arr.size
    j = median_ci_rank(n, confidence)
    if j is None:
        return None
    return MedianCI(low=float(arr[j - 1]), high=float(arr[n - j]), median=float(np.median(arr)),
                    coverage=_coverage(n, j), rank=j)


@functools.lru_cache(maxsize=None)
def _coverage(n: int, rank: int) -> float:
    return 1.0 - 2.0 * binomial_cdf(rank - 1, n)


def summarize(samples: Sequence[float]) -> dict:
    """Summary of latency samples (seconds). Plain Python numbers (None where undefined), so the result can
    go straight into JSON.

    stddev is the sample standard deviation (ddof=1; 0.0 for a single sample); percentiles use numpy's
    default linear interpolation; iqr = p75 - p25; median_ci_low/high/half_width_rel/coverage are
    median_ci() at 95 % (None below 6 samples, where no such interval exists)."""
    arr = as_samples(samples, "summarize")
    if arr.size == 0:
        raise ValueError("summarize: no samples")
    p25, p50, p75, p90, p99 = np.percentile(arr, [25, 50, 75, 90, 99])
    ci = median_ci(arr)
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
        "median_ci_low": ci.low if ci else None,
        "median_ci_high": ci.high if ci else None,
        "median_ci_half_width_rel": ci.half_width_rel if ci and math.isfinite(ci.half_width_rel) else None,
        "median_ci_coverage": ci.coverage if ci else None,
    }

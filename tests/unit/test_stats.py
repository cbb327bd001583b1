"""Tests for pytest_neoxmii.stats: the latency summary and the regression gate's statistical behaviour."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from pytest_neoxmii.stats import (
    EXACT_MAX_N,
    MIN_SAMPLES,
    LatencyComparison,
    compare_latency,
    mann_whitney_greater,
    mann_whitney_method,
    median_ci,
    summarize,
)
from pytest_neoxmii.samples import binomial_at_least, binomial_cdf, median_ci_rank

TRIALS = 2000


def latencies(rng: np.random.Generator, n: int, median: float = 0.010, spread: float = 0.03,
              outlier_rate: float = 0.03) -> np.ndarray:
    """Realistic per-round latencies: lognormal around `median` with ~3% spread, plus occasional slow
    outliers (GC pause, clock boost ending, another process) 1.5-3x slower."""
    x = median * rng.lognormal(mean=0.0, sigma=spread, size=n)
    hit = rng.random(n) < outlier_rate
    x[hit] *= rng.uniform(1.5, 3.0, size=int(hit.sum()))
    return x


def run_trials(seed: int, factor: float, trials: int = TRIALS) -> list[LatencyComparison]:
    """Baseline and current drawn with pytest-benchmark-like sample counts (20-50 rounds each); current's
    latency scaled by `factor`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials):
        base = latencies(rng, int(rng.integers(20, 51)))
        cur = latencies(rng, int(rng.integers(20, 51)), median=0.010 * factor)
        out.append(compare_latency(base.tolist(), cur.tolist()))
    return out


# ---------------------------------------------------------------- summarize

def test_summarize_known_data():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["n"] == 5
    assert s["min"] == 1.0 and s["max"] == 5.0
    assert s["mean"] == pytest.approx(3.0)
    assert s["stddev"] == pytest.approx(math.sqrt(2.5))  # sample stddev, ddof=1
    assert s["median"] == s["p50"] == 3.0
    assert s["p90"] == pytest.approx(4.6)  # linear interpolation
    assert s["p99"] == pytest.approx(4.96)
    assert s["iqr"] == pytest.approx(2.0)  # 4 - 2
    assert set(s) == {"n", "min", "max", "mean", "stddev", "median", "p50", "p90", "p99", "iqr", "median_ci_low",
                      "median_ci_high", "median_ci_half_width_rel", "median_ci_coverage"}
    # 5 samples: even [min, max] covers the median with 1 - 2/32 = 93.75 % only, so no 95 % interval
    assert s["median_ci_low"] is s["median_ci_high"] is s["median_ci_half_width_rel"] is None


def test_summarize_plain_python_types_and_edge_cases():
    s = summarize(np.array([0.5], dtype=np.float32))
    assert s["stddev"] == 0.0 and s["median"] == 0.5 and s["iqr"] == 0.0
    assert all(type(v) in (int, float) or (v is None and k.startswith("median_ci")) for k, v in s.items())
    even = summarize([4.0, 1.0, 3.0, 2.0])
    assert even["median"] == 2.5
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, float("nan")])


# ---------------------------------------------------------------- Mann-Whitney U

def test_mann_whitney_matches_scipy():
    """scipy is the oracle: the exact distribution without ties when the smaller side has at most EXACT_MAX_N,
    else asymptotic."""
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    methods = set()
    for i in range(60):
        n1, n2 = int(rng.integers(5, 60)), int(rng.integers(5, 60))
        x = latencies(rng, n1, median=0.010 * rng.uniform(0.9, 1.1))
        y = latencies(rng, n2)
        if i % 3 == 0:
            # Timer resolution makes ties common in real data: exercise the tie correction.
            x, y = np.round(x, 4), np.round(y, 4)
        method = "asymptotic" if i % 3 == 0 or min(n1, n2) > EXACT_MAX_N else "exact"
        assert mann_whitney_method(np.asarray(x), np.asarray(y)) == method, (i, n1, n2)
        methods.add(method)
        ours = mann_whitney_greater(x, y)
        ref = scipy_stats.mannwhitneyu(x, y, alternative="greater", method=method).pvalue
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-15), (i, n1, n2)
    assert methods == {"exact", "asymptotic"}


def test_mann_whitney_method_choice_at_its_boundaries():
    a = np.arange(EXACT_MAX_N, dtype=float)
    b = np.arange(40, dtype=float) + 0.5
    assert mann_whitney_method(a, b) == mann_whitney_method(b, a) == "exact"
    assert mann_whitney_method(np.r_[a, 100.0], b) == "asymptotic"       # both sides over EXACT_MAX_N
    assert mann_whitney_method(a, np.r_[b[:-1], 3.0]) == "asymptotic"    # a tie across the samples


def test_mann_whitney_direction_and_degenerate():
    slow = [2.0, 2.1, 2.2, 2.3, 2.4, 2.5]
    fast = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    assert mann_whitney_greater(slow, fast) < 0.01
    assert mann_whitney_greater(fast, slow) > 0.99
    assert mann_whitney_greater([1.0] * 6, [1.0] * 6) == 1.0  # all tied: no evidence at all


# ---------------------------------------------------------------- the gate on generated distributions

def test_identical_distributions_rarely_false_alarm():
    results = run_trials(seed=1, factor=1.0)
    false_alarms = sum(r.failed for r in results)
    assert false_alarms < TRIALS * 0.01, false_alarms
    # Neither should a no-change be called an improvement.
    assert sum(r.verdict == "improvement" for r in results) < TRIALS * 0.01


def test_15pct_slowdown_is_caught():
    results = run_trials(seed=2, factor=1.15)
    caught = sum(r.failed for r in results)
    assert caught >= TRIALS * 0.95, caught
    assert all(r.verdict in ("regression", "unchanged") for r in results)


def test_5pct_slowdown_never_fails_although_significant():
    results = run_trials(seed=3, factor=1.05)
    assert sum(r.failed for r in results) == 0
    # The change is real (the U test sees it nearly always): it is the threshold that keeps it green.
    significant = sum(r.p_value < r.alpha for r in results)
    assert significant >= TRIALS * 0.95, significant
    assert all(r.verdict == "unchanged" for r in results)


def test_15pct_improvement_is_reported_not_failed():
    results = run_trials(seed=4, factor=0.85)
    assert not any(r.failed for r in results)
    improved = sum(r.verdict == "improvement" for r in results)
    assert improved >= TRIALS * 0.95, improved


def test_insufficient_samples_never_fail():
    rng = np.random.default_rng(5)
    for n_base, n_cur in [(0, 30), (4, 30), (30, 4), (1, 1), (MIN_SAMPLES - 1, MIN_SAMPLES - 1)]:
        base = latencies(rng, n_base).tolist()
        cur = latencies(rng, n_cur, median=0.030).tolist()  # 3x slower, still must not fail
        r = compare_latency(base, cur)
        assert r.verdict == "insufficient-samples"
        assert not r.failed and r.p_value is None
        assert "insufficient-samples" in r.message() and "\n" not in r.message()
    assert compare_latency([0.01] * MIN_SAMPLES, [0.01] * MIN_SAMPLES).verdict == "unchanged"


def test_large_but_noisy_change_is_not_a_regression():
    # Median 20% slower but wildly noisy samples: not significant, so unchanged.
    base = [0.010, 0.030, 0.005, 0.020, 0.012, 0.008]
    cur = [0.012, 0.004, 0.031, 0.015, 0.009, 0.022]
    r = compare_latency(base, cur)
    assert r.ratio > 1.1 and r.p_value >= 0.01
    assert r.verdict == "unchanged" and not r.failed


# ---------------------------------------------------------------- LatencyComparison fields and message

def test_comparison_fields_and_message():
    base = [0.01231 + d for d in (-2e-4, -1e-4, 0.0, 1e-4, 2e-4)] * 4
    cur = [0.01420 + d for d in (-2e-4, -1e-4, 0.0, 1e-4, 2e-4)] * 4
    r = compare_latency(base, cur)
    assert r.baseline_median == pytest.approx(0.01231)
    assert r.current_median == pytest.approx(0.01420)
    assert r.ratio == pytest.approx(0.01420 / 0.01231)
    assert r.change_pct == pytest.approx((0.01420 / 0.01231 - 1) * 100)
    assert r.threshold == 0.10 and r.alpha == 0.01
    assert r.verdict == "regression" and r.failed
    msg = r.message()
    assert re.fullmatch(
        r"median 12\.31 ms -> 14\.20 ms \(\+15\.4%, threshold 10%\), Mann-Whitney p=\S+ < 0\.01, outside the "
        r"baseline's 95% CI \[12\.21 ms, 12\.41 ms\]: regression",
        msg,
    ), msg

    same = compare_latency(base, base)
    assert same.verdict == "unchanged" and not same.failed
    assert same.message().endswith(">= 0.01, inside the baseline's 95% CI [12.21 ms, 12.41 ms]: unchanged")

    better = compare_latency(cur, base)
    assert better.verdict == "improvement" and not better.failed
    assert "(-13.3%, threshold 10%)" in better.message()


def test_threshold_and_alpha_are_respected():
    base = [0.010 + i * 1e-5 for i in range(30)]
    cur = [x * 1.15 for x in base]
    assert compare_latency(base, cur, threshold=0.20).verdict == "unchanged"
    assert compare_latency(base, cur, threshold=0.10).verdict == "regression"
    assert compare_latency(base, cur, alpha=1e-30).verdict == "unchanged"
    with pytest.raises(ValueError):
        compare_latency(base, cur, alpha=0.0)


# ---------------------------------------------------------------- the gate's rules at their boundaries
# Written against surviving mutants: each boundary is checked on both sides.

def _steps(value: float, n: int = 8) -> list[float]:
    """n samples around `value`, each distinct (so the rank test sees no ties), median exactly `value`."""
    offsets = [(i - (n - 1) / 2) * 1e-6 for i in range(n)]
    return [value + o for o in offsets]


def test_min_samples_is_the_first_count_that_is_compared():
    slow = compare_latency(_steps(0.010, MIN_SAMPLES), _steps(0.030, MIN_SAMPLES))
    assert slow.verdict == "regression" and slow.n_baseline == slow.n_current == MIN_SAMPLES
    for n_base, n_cur in ((MIN_SAMPLES - 1, MIN_SAMPLES), (MIN_SAMPLES, MIN_SAMPLES - 1)):
        r = compare_latency(_steps(0.010, n_base), _steps(0.030, n_cur))
        assert r.verdict == "insufficient-samples" and (r.n_baseline, r.n_current) == (n_base, n_cur)


def test_regression_needs_the_median_strictly_beyond_the_threshold():
    base = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    at = compare_latency(base, [1.5] * 8, threshold=0.5)           # ratio exactly 1 + threshold
    assert at.ratio == 1.5 and at.p_value < 0.01 and at.verdict == "unchanged"
    beyond = compare_latency(base, [1.5 + 1e-9] * 8, threshold=0.5)
    assert beyond.verdict == "regression" and beyond.failed


def test_improvement_needs_the_median_strictly_beyond_the_threshold():
    base = [2.0] * 8
    at = compare_latency(base, [1.0] * 8, threshold=0.5)           # ratio exactly 1 - threshold
    assert at.ratio == 0.5 and at.p_value < 0.01 and at.verdict == "unchanged"
    assert at.change_pct == -50.0
    beyond = compare_latency(base, [1.0 - 1e-9] * 8, threshold=0.5)
    assert beyond.verdict == "improvement" and not beyond.failed


def test_p_value_is_taken_in_the_direction_the_median_moved():
    base, slower = _steps(0.010), _steps(0.020)
    up = compare_latency(base, slower)
    down = compare_latency(slower, base)
    assert up.p_value == pytest.approx(mann_whitney_greater(slower, base)) and up.p_value < 1e-3
    assert down.p_value == pytest.approx(mann_whitney_greater(slower, base)) and down.p_value < 1e-3
    assert mann_whitney_greater(base, slower) > 0.99              # the other direction: no evidence


def test_zero_threshold_is_allowed_and_negative_or_nan_is_refused():
    base = _steps(0.010)
    assert compare_latency(base, [x * 1.01 for x in base], threshold=0.0).verdict == "regression"
    for bad in (-0.01, float("nan")):
        with pytest.raises(ValueError, match="threshold must be >= 0"):
            compare_latency(base, base, threshold=bad)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            compare_latency(base, base, alpha=bad)
    assert compare_latency(base, base, alpha=0.999).verdict == "unchanged"


def test_a_zero_baseline_median():
    zeros = [0.0] * 8
    same = compare_latency(zeros, zeros)
    assert same.ratio == 1.0 and same.change_pct == 0.0 and same.verdict == "unchanged"
    slower = compare_latency(zeros, _steps(0.010))
    assert slower.ratio == math.inf and slower.verdict == "regression"


def test_non_finite_or_nested_samples_are_refused():
    with pytest.raises(ValueError, match="compare_latency current: latencies must be finite numbers"):
        compare_latency(_steps(0.01), _steps(0.01)[:-1] + [float("inf")])
    with pytest.raises(ValueError, match="compare_latency baseline: expected a flat list"):
        compare_latency([[0.01, 0.02]] * 5, _steps(0.01))
    with pytest.raises(ValueError, match="summarize: no samples"):
        summarize([])


def test_message_formats_seconds_in_the_unit_that_reads():
    def msg(base_s, cur_s):
        return compare_latency([base_s] * 8, [cur_s] * 8).message()
    assert msg(1.0, 1.0).startswith("median 1.000 s -> 1.000 s (+0.0%, threshold 10%)")
    assert msg(0.001, 0.001).startswith("median 1.00 ms -> 1.00 ms")
    assert msg(0.000999, 0.000999).startswith("median 999.0 us -> 999.0 us")
    assert msg(0.999, 0.999).startswith("median 999.00 ms -> 999.00 ms")


def test_mann_whitney_refuses_empty_or_non_finite_samples_naming_the_side():
    for x, y in (([], [1.0]), ([1.0], []), ([], [])):
        with pytest.raises(ValueError) as exc:
            mann_whitney_greater(x, y)
        assert str(exc.value) == "mann_whitney_greater: both samples must be non-empty"
    with pytest.raises(ValueError) as exc:
        mann_whitney_greater([1.0, math.nan], [1.0])
    assert str(exc.value) == "mann_whitney_greater x: latencies must be finite numbers"
    with pytest.raises(ValueError) as exc:
        mann_whitney_greater([1.0], [[1.0]])
    assert str(exc.value) == "mann_whitney_greater y: expected a flat list of latencies in seconds"
    with pytest.raises(ValueError) as exc:
        summarize([0.1, math.inf])
    assert str(exc.value) == "summarize: latencies must be finite numbers"


def test_mann_whitney_small_exact_case():
    """x = [2, 3, 4] all above y = [0, 1], no ties: exact. U = 6 is the largest U there is, reached by 1 of the
    C(5, 2) = 10 equally likely rank arrangements, so p = 0.1 (the normal approximation would say 0.074)."""
    assert mann_whitney_greater([2.0, 3.0, 4.0], [0.0, 1.0]) == pytest.approx(0.1, rel=1e-12)
    # x = [3, 4], y = [0, 1, 2]: U = 6 of 6 again, 1 arrangement of 10 -> 0.1; U = 5 ([2, 4] vs [0, 1, 3]): 2/10
    assert mann_whitney_greater([2.0, 4.0], [0.0, 1.0, 3.0]) == pytest.approx(0.2, rel=1e-12)
    # ties across the samples: x = [1, 2], y = [1, 1]; the three 1s share rank 2, the 2 has rank 4 -> U = 6 - 3
    # = 3, mean 2, tie groups (3, 1): variance = 4/12 * (5 - (27 - 3) / 12) = 1, z = (3 - 2 - 0.5) / 1
    assert mann_whitney_greater([1.0, 2.0], [1.0, 1.0]) == pytest.approx(0.5 * math.erfc(0.5 / math.sqrt(2)),
                                                                         rel=1e-12)


def test_two_samples_have_a_sample_stddev_and_none_is_a_one_line_error():
    """ddof=1 needs two samples, and two are enough: only a single sample's spread is reported as 0."""
    assert summarize([1.0, 2.0])["stddev"] == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ValueError) as exc:
        summarize([])
    assert str(exc.value) == "summarize: no samples"


# ---------------------------------------------------------------- the median's confidence interval

def test_median_ci_ranks_match_the_published_table():
    """Ranks of the 95 % distribution-free interval (e.g. Conover, Practical Nonparametric Statistics, table
    A3): below 6 samples there is none; n = 20 -> [x_(6), x_(15)]."""
    expected = {5: None, 6: 1, 8: 1, 9: 2, 12: 3, 15: 4, 17: 5, 20: 6, 25: 8, 30: 10, 50: 18}
    assert {n: median_ci_rank(n) for n in expected} == expected
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        median_ci_rank(20, 1.0)


def test_the_exact_binomial_agrees_with_scipy_and_gives_the_same_ranks():
    from scipy.stats import binom, binomtest
    for n in list(range(1, 120)) + [199, 200, 333, 1000]:
        ks = np.arange(-1, n + 1)
        ours = np.array([binomial_cdf(int(k), n) for k in ks])
        np.testing.assert_allclose(ours, binom.cdf(ks, n, 0.5), rtol=1e-9, atol=0)
    for n, p in ((16, Fraction(1, 10)), (128, Fraction(1, 10)), (2048, Fraction(1, 10)), (40, Fraction(3, 7))):
        for k in sorted({0, 1, 2, 3, n // 10, n // 5, n // 2, n - 1, n}):
            expected = binomtest(k, n, float(p), alternative="greater").pvalue
            assert binomial_at_least(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-300), (n, p, k)
            assert binomial_cdf(k, n, p) == pytest.approx(float(binom.cdf(k, n, float(p))), rel=1e-9), (n, p, k)
        for confidence in (0.9, 0.95, 0.99):
            tail = (1 - confidence) / 2
            if binom.cdf(0, n, 0.5) > tail:
                expected = None
            else:
                q = int(binom.ppf(tail, n, 0.5))
                expected = min(q + 1 if binom.cdf(q, n, 0.5) <= tail else q, (n + 1) // 2)
            assert median_ci_rank(n, confidence) == expected, (n, confidence)


def test_timing_and_collecting_never_import_scipy_stats():
    """scipy.stats costs 1.1 s to import on a 2-core EPYC: a worker timing latency and a session collecting the
    suite do without it (the latency gate imports it when it runs)."""
    code = ("import sys; import pytest_neoxmii.samples, pytest_neoxmii.stats, pytest_neoxmii.latency, "
            "pytest_neoxmii.checks, pytest_neoxmii.suite.test_reference, pytest_neoxmii.suite.test_latency; "
            "print('scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1:] == ["False"], out.stderr[-2000:]


def test_median_ci_bounds_and_coverage():
    x = [float(v) for v in range(1, 21)]            # 1..20 shuffled: order statistics do not care
    ci = median_ci(x[::-1])
    assert (ci.low, ci.high, ci.median, ci.rank) == (6.0, 15.0, 10.5, 6)
    assert ci.coverage == pytest.approx(1 - 2 * 0.020694732666015625)   # P(Binomial(20, 1/2) <= 5)
    assert ci.half_width_rel == pytest.approx(4.5 / 10.5)
    assert median_ci(x[:5]) is None
    # The interval holds what it promises: on skewed latencies with outliers it covers the true median in
    # >= 95 % of draws (within 3 standard errors of 2000 trials), and it is not grossly conservative.
    rng = np.random.default_rng(11)
    true_median = 0.010 * np.exp(0.0)              # lognormal median; outliers (3 %) move it by < 1e-3
    covered = 0
    for _ in range(2000):
        s = latencies(rng, int(rng.integers(6, 40)), outlier_rate=0.0)
        c = median_ci(s)
        covered += c.low <= true_median <= c.high
    assert 0.95 - 3 * math.sqrt(0.95 * 0.05 / 2000) <= covered / 2000 <= 0.995, covered


def test_regression_needs_the_median_outside_the_baseline_ci():
    """A widely spread baseline cannot pin its median down. A current run whose median is 10.7 % slower,
    significant by the U test (half its rounds are very slow), still lies inside the baseline median's
    interval and is not a regression; the same current run against a tight baseline is."""
    base = [0.008 + i * 0.0003 for i in range(20)]           # median 10.85 ms, 95 % CI [9.50 ms, 12.20 ms]
    cur = _steps(0.0120, 11) + _steps(0.020, 10)              # median 12.005 ms
    r = compare_latency(base, cur)
    assert r.ratio > 1.10 and r.p_value < 0.01
    assert r.baseline_ci.high == pytest.approx(0.0122) and r.outside_baseline_ci is False
    assert r.verdict == "unchanged" and not r.failed
    assert "inside the baseline's 95% CI [9.50 ms, 12.20 ms]: unchanged" in r.message()
    tight = compare_latency(_steps(0.01085, 20), cur)
    assert tight.outside_baseline_ci and tight.verdict == "regression"
    # the mirror image for improvements
    better = compare_latency(base, _steps(0.0097, 11) + _steps(0.001, 10))
    assert better.ratio < 0.90 and better.p_value < 0.01 and better.outside_baseline_ci is False
    assert better.verdict == "unchanged"
    assert compare_latency(_steps(0.01085, 20), _steps(0.0097, 11) + _steps(0.001, 10)).verdict == "improvement"


# ---------------------------------------------------------------- written against the merged tree's survivors
# (scipy's mannwhitneyu and samples.py, 2026-11-27; docs/MUTATION.md lists them)

def test_p_equal_to_alpha_is_not_significant():
    """The rule is p < alpha: a p-value exactly at alpha decides neither a regression nor an improvement, and
    the message says ">=". (Exact p-values are ratios such as 1 / C(16, 8), so equality is reachable.)"""
    base, slower = _steps(0.010), _steps(0.020)
    p = mann_whitney_greater(slower, base)
    assert p == pytest.approx(1 / 12870)
    up = compare_latency(base, slower, alpha=p)
    assert up.p_value == p and up.verdict == "unchanged" and not up.failed
    assert f"p=7.8e-05 >= {p:g}, outside" in up.message()
    down = compare_latency(slower, base, alpha=p)
    assert down.p_value == p and down.verdict == "unchanged"
    assert compare_latency(base, slower, alpha=p * 1.0001).verdict == "regression"


def test_a_current_median_at_the_end_of_the_baseline_ci_is_inside_it():
    """"Outside the baseline's interval" means strictly beyond its end: 8 samples give the interval [min, max]
    (rank 1), and a current median equal to that end is not a regression (nor, mirrored, an improvement)
    although the median moved by 100 % / -50 % with p < 0.001."""
    r = compare_latency([1.0] * 7 + [2.0], [2.0] * 8)
    assert r.baseline_ci.high == r.current_median == 2.0 and r.p_value < 1e-3 and r.ratio == 2.0
    assert r.outside_baseline_ci is False and r.verdict == "unchanged"
    m = compare_latency([1.0] + [2.0] * 7, [1.0] * 8)
    assert m.baseline_ci.low == m.current_median == 1.0 and m.p_value < 1e-3 and m.ratio == 0.5
    assert m.outside_baseline_ci is False and m.verdict == "unchanged"


def test_the_current_median_ci_is_reported():
    base, cur = _steps(0.010, 20), _steps(0.012, 20)
    r = compare_latency(base, cur)
    assert r.current_ci == median_ci(cur) and r.baseline_ci == median_ci(base)


def test_mann_whitney_with_a_single_sample_per_side():
    """One sample each, no tie: exact, the two orders equally likely -> 0.5 or 1.0; one value tied: 1.0."""
    assert mann_whitney_greater([2.0], [1.0]) == pytest.approx(0.5)
    assert mann_whitney_greater([1.0], [2.0]) == 1.0
    assert mann_whitney_greater([1.0], [1.0]) == 1.0
    assert mann_whitney_greater([1.0], [1.0, 1.0]) == 1.0


def test_an_empty_side_is_insufficient_without_a_numpy_warning():
    """The median of no samples is nan, and asked of numpy it says "Mean of empty slice" in the user's
    pytest output: compare_latency does not ask."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for base, cur in (([], _steps(0.01)), (_steps(0.01), []), ([], [])):
            r = compare_latency(base, cur)
            assert r.verdict == "insufficient-samples"
            assert math.isnan(r.baseline_median) == (not base) and math.isnan(r.current_median) == (not cur)


def test_samples_are_float64_whatever_came_in():
    from pytest_neoxmii.samples import as_samples
    assert as_samples([1, 2, 3], "x").dtype == np.float64
    assert as_samples(np.array([0.1, 0.2], dtype=np.float32), "x").dtype == np.float64


def test_median_ci_honours_its_confidence_and_names_itself_in_errors():
    x = [float(v) for v in range(1, 21)]
    ci = median_ci(x, 0.99)
    assert (ci.low, ci.high, ci.rank) == (4.0, 17.0, 4) and median_ci_rank(20, 0.99) == 4
    assert ci.coverage == pytest.approx(1 - 2 * 0.0012884140014648438)  # P(Binomial(20, 1/2) <= 3)
    with pytest.raises(ValueError) as exc:
        median_ci([1.0, math.nan])
    assert str(exc.value) == "median_ci: latencies must be finite numbers"


def test_summarize_reports_the_median_ci_from_six_samples_on():
    s = summarize([float(v) for v in range(20, 0, -1)])
    assert (s["median_ci_low"], s["median_ci_high"]) == (6.0, 15.0)
    assert s["median_ci_half_width_rel"] == pytest.approx(4.5 / 10.5)
    assert s["median_ci_coverage"] == pytest.approx(1 - 2 * 0.020694732666015625)
    six = summarize([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])             # the fewest with an interval: [min, max]
    assert (six["median_ci_low"], six["median_ci_high"]) == (1.0, 6.0)
    assert six["median_ci_coverage"] == pytest.approx(1 - 2 / 64)
    # a zero median has an interval but no finite relative half-width: None, as JSON cannot hold inf
    zero = summarize([0.0] * 6 + [1.0])
    assert (zero["median_ci_low"], zero["median_ci_high"]) == (0.0, 1.0)
    assert zero["median_ci_half_width_rel"] is None and zero["median_ci_coverage"] == pytest.approx(1 - 2 / 128)
    few = summarize([1.0, 2.0, 3.0, 4.0, 5.0])                 # below 6 samples: no 95 % interval
    assert [few[k] for k in ("median_ci_low", "median_ci_high", "median_ci_half_width_rel",
                             "median_ci_coverage")] == [None] * 4

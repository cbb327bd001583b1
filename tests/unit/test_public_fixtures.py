"""The public deployment fixtures and assert_matches_reference, through pytester: the README's example
"Write your own acceptance test" runs as written, a failing comparison raises with the parity table, and a
deployment that cannot run skips with the reason."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("preloaded")

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    marker = text.index("<!-- example: test_my_deployment.py")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


def test_the_readme_example_runs(pytester, synthetic_14m, on_the_cpu):
    pytester.makepyfile(test_my_deployment=readme_example())
    result = pytester.runpytest(*synthetic_14m, "--neox-dtype=fp32", "-s")
    result.assert_outcomes(passed=2)
    # the table: one greedy and one teacher-forced row per prompt, every verdict ok
    result.stdout.fnmatch_lines(["*prompt*tokens*check*result*verdict*",
                                 "*The quick brown fox jumps*greedy*1/1 rows identical*ok",
                                 "*The quick brown fox jumps*teacher-forced*within the floor*ok",
                                 "*ids 510 3158 8516 30013 27287...*6*greedy*ok",
                                 "*ids 510 3158 8516 30013 27287...*6*teacher-forced*ok"])


FAILING = """
import pytest
from pytest_neoxmii import assert_matches_reference

class Shifted:
    '''A deployment that answers one token off: what a broken engine looks like to the helper.'''
    def __init__(self, backend):
        self.backend, self.info, self.can_score = backend, backend.info, True
    def generate(self, batch, n, top_k=5):
        gen = self.backend.generate(batch, n, top_k)
        gen.tokens = [[(t + 1) % 1000 for t in row] for row in gen.tokens]
        return gen
    def score(self, batch):
        s = self.backend.score(batch)
        s.logprobs = s.logprobs.roll(1, dims=-1)
        return s

def test_broken(neox, neox_ds):
    assert_matches_reference(neox, Shifted(neox_ds), ["a b c d"], max_new_tokens=4)

def test_skips_when_not_selected(neox, neox_zero):
    pass
"""


def test_a_mismatch_raises_with_the_parity_table(pytester, synthetic_14m, on_the_cpu):
    pytester.makepyfile(test_broken=FAILING)
    result = pytester.runpytest(*synthetic_14m, "--neox-dtype=fp32", "-rs")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "*ParityFailure: ds: fp32 on cpu*: 2 of 2 checks differ from the fp32 HF reference beyond the session's "
        "tolerances (top-5 near-tie rule, 10x the noise floor)",
        "*prompt*tokens*check*result*",
        "*a b c d*greedy*FAIL",
        "*a b c d*teacher-forced*FAIL",
        "*greedy parity FAILED*",
        "*teacher-forced parity FAILED*",
        "SKIPPED*backend zero not selected (--neox-backends=ds)*",
    ])


BENCHMARKED = """
def test_timed(neox_benchmark):
    assert type(neox_benchmark).__name__ == "BenchmarkFixture"
"""


def test_neox_benchmark_is_pytest_benchmarks_fixture_and_a_skip_where_the_run_does_not_load_it(pytester):
    """The shipped latency test asks for it: with `-p no:benchmark` the bare `benchmark` fixture was an error
    at each latency test's setup."""
    pytester.makepyfile(test_timed=BENCHMARKED)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:benchmark", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_timed.py:*: latency is measured through pytest-benchmark, "
                                 "which this run does not load (-p no:benchmark)"])


SKIPPED_BEFORE_TIMING = """
import pytest

def test_timed(neox_benchmark):
    pytest.skip("the engine cannot run here")       # what check_latency does for an engine that cannot deploy
"""


def test_a_latency_test_skipping_before_it_times_draws_no_warning_from_pytest_benchmark(pytester):
    """pytest-benchmark learns that a test skipped only from the fixtures the test asked for by name; fetched
    by getfixturevalue, the fixture was 'not used at all in this test' (a PytestBenchmarkWarning for each
    latency test of an engine that cannot run here: a mistyped --neox-zero-nvme, MII not installed)."""
    pytester.makepyfile(test_timed=SKIPPED_BEFORE_TIMING)
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "error::pytest_benchmark.logger.PytestBenchmarkWarning")
    result.assert_outcomes(skipped=1)
    assert "not used at all" not in result.stdout.str()


def test_benchmark_skip_and_only_tell_latency_tests_from_the_others(pytester):
    """pytest-benchmark sorts the tests by the fixtures they ask for by name, while it collects them:
    --benchmark-skip skips the latency tests before the session deploys anything for them, and
    --benchmark-only runs them alone (with the fixture fetched by getfixturevalue it skipped them too)."""
    pytester.makepyfile(test_timed=BENCHMARKED + "\n\ndef test_not_timed():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--benchmark-skip", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_timed.py: Skipping benchmark (--benchmark-skip active)."])
    result = pytester.runpytest("-p", "no:cacheprovider", "--benchmark-only", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_timed.py: Skipping non-benchmark (--benchmark-only active)."])


DISABLED = """
from pytest_neoxmii.checks import check_latency

def test_timed(neox_benchmark):
    check_latency(None, "hf", 1, neox_benchmark, None)     # skips before it asks the session for anything
"""


def test_a_latency_check_under_benchmark_disable_skips_saying_why(pytester):
    pytester.makepyfile(test_timed=DISABLED)
    result = pytester.runpytest("-p", "no:cacheprovider", "--benchmark-disable", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_timed.py:*: pytest-benchmark is disabled (--benchmark-disable): "
                                 "latency is not measured in this run"])

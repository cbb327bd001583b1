"""Latency per backend (the hf peer and every selected backend) and batch size, under pytest-benchmark
(pedantic mode, explicit warm-up, CUDA events around every timed region): TTFT, TPOT, end-to-end p50/p90/p99,
tokens/s, peak GPU memory, the ratio to HF measured side by side and the weight-streaming floor, in
benchmark.extra_info, the JUnit XML and the report. The only assertion is the regression gate against the
baseline of this GPU class (record it with --neox-update-baselines)."""
import pytest

from pytest_neoxmii.checks import check_latency
from pytest_neoxmii.latency import BATCH_SIZES

pytestmark = pytest.mark.neox_alone     # timed alone, after the session's other tests (see plugin.py)

@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=[f"bs{b}" for b in BATCH_SIZES])
def test_latency(neox, neox_each_backend, batch_size, neox_benchmark, request):
    check_latency(neox, neox_each_backend, batch_size, neox_benchmark, request)

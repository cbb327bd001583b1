"""Golden outputs for model-upgrade acceptance: greedy ids (with top-k logprobs) per generating case and the
perplexity of the fixed text, per backend (the fp32 HF reference and every selected backend). Recorded with
--neox-update-baselines; otherwise compared with the parity engine's rules (near-tie top-k rule, perplexity
within the noise-floor multiple), failing with which cases changed and how."""
import pytest

from pytest_neoxmii.checks import check_golden, check_golden_perplexity


def test_golden_greedy(neox, neox_each_backend, neox_generation_case, request):
    check_golden(neox, neox_each_backend, neox_generation_case, request)


@pytest.mark.neox_scores("fixed-text")    # computed ahead in the engine's worker, as parity's cases are
def test_golden_perplexity(neox, neox_each_backend, request):
    check_golden_perplexity(neox, neox_each_backend, request)

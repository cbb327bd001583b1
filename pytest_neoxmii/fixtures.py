"""The plugin's fixtures. `neox` is the session (one model, backends loaded once and torn down at the
end); the case fixtures turn the collection-time plans (see plugin.pytest_generate_tests) into token ids.

Public deployment fixtures, session-scoped, for users' own tests (see README, "Write your own acceptance
test"): `neox_reference` (HF transformers, fp32: the ground truth), `neox_ds`, `neox_mii` and `neox_zero`.
Each is deployed once per session, as the options say (--neox-dtype, --neox-tp, --neox-ds-config, ...), and
torn down at the end; a deployment that cannot run here (or is not in --neox-backends) skips the tests that
request it, with the reason."""
from __future__ import annotations

import pytest

from pytest_neoxmii.session import get_session


@pytest.fixture(scope="session")
def neox(request):
    """The NeoxSession: `neox.backend("ds")`, `neox.reference()`, `neox.case(plan)`, ... Backends are
    loaded on first use and all released when the session ends (also after failures)."""
    session = get_session(request.config)
    session.require_model()
    session.prelaunch()         # the engines' workers load while the first tests run
    yield session
    session.close()


@pytest.fixture
def neox_case(neox, neox_case_plan):
    if neox_case_plan is None:
        pytest.skip("no cases: no --neox-model given")
    return neox.case(neox_case_plan)


@pytest.fixture
def neox_generation_case(neox, neox_generation_plan):
    if neox_generation_plan is None:
        pytest.skip("no cases: no --neox-model given")
    return neox.case(neox_generation_plan)


@pytest.fixture(scope="session")
def neox_reference(neox):
    """The HF transformers reference in fp32, the ground truth every deployment is compared with."""
    return neox.reference()


@pytest.fixture(scope="session")
def neox_ds(neox):
    """DeepSpeed inference (init_inference, kernel injection on CUDA; tp >= 2 under the DeepSpeed launcher)."""
    return neox.backend("ds")


@pytest.fixture(scope="session")
def neox_mii(neox):
    """DeepSpeed-MII legacy deployment (in process at tp=1, the LOCAL gRPC server at tp >= 2)."""
    return neox.backend("mii")


@pytest.fixture(scope="session")
def neox_zero(neox):
    """ZeRO-Inference: ZeRO stage 3 with the parameters offloaded to CPU (or NVMe, --neox-zero-nvme)."""
    return neox.backend("zero")


class BenchmarkThroughPytestBenchmark:
    """`neox_benchmark` where pytest-benchmark is loaded: its `benchmark` fixture, which the latency checks
    feed their rounds into. Asked for by name, so that pytest-benchmark sees it among the test's fixtures: it
    then knows when the test skipped before timing (an engine that cannot run here) instead of warning that
    the fixture was not used, and --benchmark-skip skips the test at collection, before anything deploys."""

    @pytest.fixture
    def neox_benchmark(self, benchmark):
        return benchmark


class BenchmarkNotLoaded:
    """`neox_benchmark` where the run does not load pytest-benchmark (`-p no:benchmark`): the test skips saying
    so (asked for directly, `benchmark` was an error at every latency test's setup: "fixture 'benchmark' not
    found")."""

    @pytest.fixture
    def neox_benchmark(self):
        pytest.skip("latency is measured through pytest-benchmark, which this run does not load "
                    "(-p no:benchmark)")


def register_neox_benchmark(config: pytest.Config) -> None:
    """Register the `neox_benchmark` fixture that fits this run (pytest_configure: plugins are loaded by then)."""
    holder = BenchmarkThroughPytestBenchmark if config.pluginmanager.hasplugin("benchmark") else BenchmarkNotLoaded
    config.pluginmanager.register(holder(), "neoxmii-benchmark-fixture")

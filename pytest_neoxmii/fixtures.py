"""The plugin's fixtures. `neox` is the session (one model, backends loaded once and torn down at the
end); the case fixtures turn the collection-time plans (see plugin.pytest_generate_tests) into token ids."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def neox(request):
    """The NeoxSession: `neox.backend("ds")`, `neox.reference()`, `neox.case(plan)`, ... Backends are
    loaded on first use and all released when the session ends (also after failures)."""
    from pytest_neoxmii.plugin import get_session
    session = get_session(request.config)
    session.require_model()
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

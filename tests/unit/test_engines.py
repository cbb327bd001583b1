"""The engine registry: every name the plugin accepts, orders or describes comes from it, and each engine's
traits are class attributes read there. A stand-in engine registered with one line (in a conftest.py, as a
user's own engine would be) is selectable by --neox-backends, described in the header, judged against the
fp32 reference, and ordered in the report by its registration."""
from __future__ import annotations

import textwrap

import pytest

from pytest_neoxmii import backends, options, precision, report
from pytest_neoxmii.backends import ENGINES
from pytest_neoxmii.errors import NeoxUsageError


def test_the_built_in_engines_in_display_order():
    assert backends.names() == ("hf", "ds", "mii", "zero")
    assert backends.reference_name() == "hf"
    assert [n for n, e in ENGINES.items() if e.tensor_parallel_capable] == ["ds", "mii"]
    assert [n for n, e in ENGINES.items() if e.needs_deepspeed] == ["ds", "mii", "zero"]
    assert [n for n, e in ENGINES.items() if not e.weights_on_gpu] == ["zero"]
    assert all(e.description for e in ENGINES.values())


def test_tensor_parallel_runs_another_class_only_where_the_engine_has_one():
    ds, zero = backends.engine("ds"), backends.engine("zero")
    assert ds.backend_for(1).__name__ == "DeepSpeedBackend" and not ds.backend_for(1).runs_in_worker
    assert ds.backend_for(2).__name__ == "DsLauncherBackend" and ds.backend_for(2).runs_in_worker
    assert backends.engine("mii").backend_for(2).can_score is False      # MII's gRPC API returns text only
    assert zero.backend_for(4) is zero.backend


def test_an_unknown_engine_is_named_with_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'vllm': choose from hf, ds, mii, zero"):
        backends.engine("vllm")


@pytest.fixture
def registered():
    """Registers stand-in engines for one test and restores the registry afterwards."""
    saved = dict(ENGINES)
    yield backends.register
    ENGINES.clear()
    ENGINES.update(saved)


def test_everything_that_lists_engines_reads_the_registry(registered):
    from pytest_neoxmii.backends.hf import HFBackend

    class Twin(HFBackend):
        is_reference = False
        needs_deepspeed = True

    registered("copy", Twin)
    assert backends.names()[-1] == "copy"
    assert backends.display_order(["copy", "zero", "gone", "hf"]) == ["hf", "zero", "copy", "gone"]
    assert precision.runs_on_deepspeed("copy") and not precision.runs_on_deepspeed("hf")
    _, rows = report.verdict_rows({"copy": {"greedy": _counts(1)}, "ds": {"greedy": _counts(2)}})
    assert [r[0] for r in rows] == ["ds", "copy"]


def test_options_accept_only_registered_engines(registered, pytester):
    from pytest_neoxmii.backends.hf import HFBackend
    registered("copy", HFBackend)
    assert options.NeoxOptions.from_config(pytester.parseconfig("--neox-backends=hf,copy")).backends == ("hf", "copy")
    ENGINES.pop("copy")
    with pytest.raises(NeoxUsageError,
                       match="unknown backend 'copy' in --neox-backends: choose from hf, ds, mii, zero"):
        options.NeoxOptions.from_config(pytester.parseconfig("--neox-backends=hf,copy"))


def _counts(passed: int) -> dict:
    return {"passed": passed, "failed": 0, "xfail": 0, "xpass": 0, "informational": 0, "known_issues": [],
            "outside_config": 0}


# --- a stand-in engine from a conftest.py, in a real session --------------------------------------------------

STAND_INS = textwrap.dedent('''
    from pytest_neoxmii.backends import register
    from pytest_neoxmii.backends.hf import HFBackend


    class CopyBackend(HFBackend):
        """The HF model again, under its own name: parity with the reference at the session's dtype."""
        description = "stand-in: the HF model under another name"
        is_reference = False

        @classmethod
        def load(cls, request):
            return cls(request.path, request.dtype, request.device, name="copy")


    class SkewedBackend(CopyBackend):
        """The HF model with its output head negated: every greedy step picks another token."""
        description = "stand-in: the HF model with its output head negated"

        @classmethod
        def load(cls, request):
            backend = cls(request.path, request.dtype, request.device, name="skewed")
            backend.model.embed_out.weight.data.neg_()
            return backend


    register("copy", CopyBackend)
    register("skewed", SkewedBackend)
''')

JUDGED = textwrap.dedent('''
    from pytest_neoxmii.checks import check_greedy


    def test_greedy(neox, neox_backend_name, neox_generation_case, request):
        check_greedy(neox, neox_backend_name, neox_generation_case, request)
''')


def test_a_stand_in_engine_registered_in_a_conftest_is_selected_described_judged_and_ordered(
        pytester, synthetic_14m):
    pytester.makeconftest(STAND_INS)
    pytester.makepyfile(test_judged=JUDGED)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    # Selected in the other order than registered: the report follows the registry.
    result = pytester.runpytest_subprocess(*args, "--neox-backends=skewed,copy", "--neox-dtype=bf16",
                                           "--neox-max-new-tokens=4", "-k", "short-b1-len4", "-v")
    out = result.stdout.str()
    assert "neoxmii: backend skewed: stand-in: the HF model with its output head negated" in result.outlines
    assert "neoxmii: backend copy: stand-in: the HF model under another name" in result.outlines
    verdicts = {ln.split()[0].split("::")[1]: ln.split()[1] for ln in result.outlines
                if ln.startswith("test_judged.py::") and ln.split()[1] in ("PASSED", "FAILED")}
    assert verdicts == {"test_greedy[short-b1-len4-skewed]": "FAILED", "test_greedy[short-b1-len4-copy]": "PASSED"}, out
    table = out[out.index("verdicts per backend:"):].splitlines()
    rows = [ln.split()[0] for ln in table[1:] if ln.split() and ln.split()[0] in ("copy", "skewed")]
    assert rows == ["copy", "skewed"], out


# --- latency reads the traits too --------------------------------------------------------------------------------

class _WorkerDeploymentStandIn:
    """What the latency harness sees of a tp >= 2 deployment: no .model, GPUs listed as "cuda:0,1"."""
    runs_in_worker = True

    def __init__(self):
        from pytest_neoxmii.backends.base import BackendInfo
        self.info = BackendInfo(backend="ds", dtype="fp16", device="cuda:0,1", tensor_parallel=2)
        self.calls = []

    def generate(self, batch, max_new_tokens, top_k=5):
        self.calls.append(max_new_tokens)


def test_a_worker_deployment_is_timed_through_its_own_generate_with_a_wall_clock():
    from pytest_neoxmii import latency
    from pytest_neoxmii.outputs import PromptBatch
    backend = _WorkerDeploymentStandIn()
    result = latency.measure_backend(backend, PromptBatch(rows=((7, 8),)), 16, rounds=3, warmup=1)
    assert backend.calls == [1, 16] * 4                   # prefill then full, warm-up round included
    assert len(result.e2e) == 3 and result.peak_gpu_memory_bytes is None
    assert "worker channel" in result.notes[0]


def test_every_trait_of_an_engine_is_either_what_it_computes_or_where_it_runs():
    """Stand-ins (a worker's proxy, a released reference's handle) answer traits from the engine's class by
    these two lists: a trait added to Backend and to neither would be answered wrongly by them."""
    from pytest_neoxmii.backends.base import Backend
    traits = {name for name, value in vars(Backend).items()
              if not name.startswith("_") and not callable(value) and name.islower()
              and not isinstance(value, (classmethod, staticmethod, property))}
    assert traits == set(Backend.ENGINE_TRAITS) | set(Backend.PLACEMENT_TRAITS)
    assert not set(Backend.ENGINE_TRAITS) & set(Backend.PLACEMENT_TRAITS)


def test_a_workers_proxy_answers_what_its_engine_computes_and_says_it_runs_in_a_worker():
    from pytest_neoxmii.backends.isolated import IsolatedEngine
    from pytest_neoxmii.backends.zero_inference import ZeroInferenceBackend
    proxy = IsolatedEngine.__new__(IsolatedEngine)      # traits only: nothing is launched
    proxy.take_traits(ZeroInferenceBackend)
    assert proxy.weights_on_gpu is False and proxy.description == ZeroInferenceBackend.description
    assert proxy.runs_in_worker is True              # where it runs stays the proxy's own


def test_every_registered_engine_has_its_worker_imports_done_by_the_fork_server():
    """A forked worker finds imported what its engine's worker_imports lists (deploy/forkserver.py): an
    engine on DeepSpeed or on transformers' modules that left them out would import them in each worker,
    3-8 CPU-s a worker on the 2-core CI machines."""
    from pytest_neoxmii import backends
    from pytest_neoxmii.backends.torch_model import TorchModelBackend
    isolated = [backends.engine(name).backend for name in backends.names() if backends.engine(name).backend.isolated]
    assert isolated, "no registered engine runs in a worker"
    for cls in isolated:
        needs = {*(["transformers"] if issubclass(cls, TorchModelBackend) else []),
                 *(["deepspeed"] if cls.needs_deepspeed else [])}
        assert needs <= set(cls.worker_imports), (cls.__name__, cls.worker_imports)

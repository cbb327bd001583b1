"""Reference first (reference_first.py, NeoxSession._reference_first): before an engine deploys, the HF
reference's outputs of every case are computed and the HF models released; afterwards neox.reference() and
neox.peer() are handles that answer cached lookups without loading and reload once for anything else.

A real NeoxSession runs with stand-in backends: session.load is replaced by a factory that counts loads and
closes, the cases are fixed token rows (no tokenizer), and the GPUs are faked (conftest.fake_gpus)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_neoxmii import backends as engines
from pytest_neoxmii.backends.base import Backend, BackendInfo
from pytest_neoxmii.cases import Case, CasePlan, plan_cases
from pytest_neoxmii.options import NeoxOptions
from pytest_neoxmii.outputs import Generation, PromptBatch, Scores
from pytest_neoxmii.reference_first import EngineOnGpu, ReferenceHandle, footprint, scoring_bytes
from pytest_neoxmii.registry import lookup
from pytest_neoxmii.session import NeoxSession

PLANS = [CasePlan(id="short-b1-len3", family="short", lengths=(3,), generate=True, max_new_tokens=2),
         CasePlan(id="batch-b2-len3", family="batch", lengths=(3, 3), generate=True, max_new_tokens=2),
         CasePlan(id="long-b1-len3", family="long", lengths=(3,), generate=False, max_new_tokens=2)]


class StandIn(Backend):
    """A loaded model with fixed outputs that logs every call (load, generate, score, close) to `log`."""

    def __init__(self, name: str, dtype: str, log: list):
        self.info = BackendInfo(backend=name, dtype=dtype, device="cpu")
        self.model = f"{name}-{dtype}-model"
        self.log = log
        log.append(("load", name, dtype))

    def generate(self, batch, max_new_tokens, top_k=5):
        self.log.append(("generate", self.info.backend, self.info.dtype))
        return Generation(tokens=[[1] * max_new_tokens] * batch.batch_size)

    def score(self, batch):
        self.log.append(("score", self.info.backend, self.info.dtype))
        return Scores(logprobs=None, mask=None)

    def close(self):
        self.log.append(("close", self.info.backend, self.info.dtype))


class StandInReference(StandIn):
    is_reference = True


class GpuEngine(StandIn):
    """An engine whose weights sit on the GPU, that injects no kernels (nothing is built)."""


def make_session(monkeypatch, model: str = "pythia-14m", mode: str = "always", dtype: str = "fp16"):
    monkeypatch.setitem(engines.ENGINES, "big", engines.Engine("big", GpuEngine))
    options = NeoxOptions(model=model, revision="main", weights="synthetic", dtype=dtype, tp=1,
                          backends=("hf", "big"), baseline_dir=Path("baselines"), update_baselines=False,
                          max_new_tokens=2, seed=0, top_k=2, parity_multiple=10.0, cases="default",
                          cache_dir=None, zero_nvme=None, latency_threshold=0.1, report_dir=None,
                          reference_first=mode)
    session = NeoxSession(options, SimpleNamespace(spec=lookup(model), path=Path("unused")))
    session.log = []
    monkeypatch.setattr(session, "load", lambda name, dtype: (StandInReference if engines.is_reference(name)
                                                               else GpuEngine)(name, dtype, session.log))
    monkeypatch.setattr(session, "plans", lambda: PLANS)
    for plan in PLANS:
        rows = tuple(tuple(range(5, 5 + n)) for n in plan.lengths)
        session._cache[("case", plan.id)] = Case(plan, PromptBatch(rows=rows, pad_token_id=0))
    return session


def calls(session, kind: str) -> list[tuple]:
    return [entry for entry in session.log if entry[0] == kind]


@pytest.fixture
def on_cpu(fake_gpus):
    fake_gpus()


def test_always_precomputes_every_case_then_closes_both_hf_models(monkeypatch, on_cpu):
    session = make_session(monkeypatch)
    reference = session.reference()                       # a test used the reference before the engine
    assert isinstance(reference, ReferenceHandle) and reference.loaded
    session.backend("big")
    # fp32 reference and fp16 peer: generation of the 2 generating cases, scores of all 3
    assert sorted(calls(session, "generate")) == sorted([("generate", "hf", d) for d in ("fp32", "fp16")] * 2)
    assert sorted(calls(session, "score")) == sorted([("score", "hf", d) for d in ("fp32", "fp16")] * 3)
    for dtype in ("fp32", "fp16"):
        for plan in PLANS:
            assert (("generate", "hf", dtype, plan.id) in session._cache) == plan.generate
            assert ("score", "hf", dtype, plan.id) in session._cache
    assert calls(session, "close") == [("close", "hf", "fp32"), ("close", "hf", "fp16")]
    # the HF models were closed before the engine loaded
    assert session.log.index(("close", "hf", "fp16")) < session.log.index(("load", "big", "fp16"))
    assert not session.reference().loaded and not session.peer().loaded
    assert session.reference() is reference                # a fixture that kept it sees the release
    assert session.reference_releases == ["reference first: 3 cases precomputed, hf fp32 + fp16 released "
                                       "before big (--neox-reference-first=always)"]


def test_cached_lookups_after_the_release_do_not_reload(monkeypatch, on_cpu):
    session = make_session(monkeypatch)
    session.backend("big")
    loads = len(calls(session, "load"))
    for plan in PLANS:
        case = session.case(plan)
        for backend in (session.reference(), session.peer()):
            if plan.generate:
                assert session.generation(backend, case).tokens == [[1, 1]] * len(plan.lengths)
            session.scores(backend, case)
    reference = session.reference()
    assert reference.info.backend == "hf" and reference.info.dtype == "fp32"    # the BackendInfo is kept
    assert reference.is_reference and not reference.runs_in_worker            # traits answered unloaded
    assert len(calls(session, "load")) == loads and not reference.loaded and reference.reloads == 0


def test_an_uncached_call_reloads_exactly_once_and_stays_loaded(monkeypatch, on_cpu):
    session = make_session(monkeypatch)
    session.backend("big")
    reference = session.reference()
    case = session.case(PLANS[0])
    reference.generate(case.batch, 4)                     # uncached (test_reference's determinism check)
    reference.generate(case.batch, 4)
    assert reference.model == "hf-fp32-model"            # .model for latency timing: the loaded one
    assert calls(session, "load").count(("load", "hf", "fp32")) == 2       # first load + one reload
    assert reference.reloads == 1 and reference.loaded
    assert not session.peer().loaded                      # only what was asked for came back
    closed = len(calls(session, "close"))
    session.close()                                       # the reloaded model is closed, the released one not again
    assert calls(session, "close")[closed:] == [("close", "hf", "fp32"), ("close", "big", "fp16")]


def test_a_second_engine_releases_a_reloaded_model_without_computing_again(monkeypatch, on_cpu):
    monkeypatch.setitem(engines.ENGINES, "big2", engines.Engine("big2", GpuEngine))
    session = make_session(monkeypatch)
    session.options = dataclasses.replace(session.options, backends=("hf", "big", "big2"))
    session.backend("big")
    session.peer().model                                  # the HF latency test reloads the peer
    before = len(calls(session, "generate")) + len(calls(session, "score"))
    session.backend("big2")
    assert len(calls(session, "generate")) + len(calls(session, "score")) == before
    assert not session.peer().loaded
    assert session.reference_releases[-1] == ("reference first: 0 cases precomputed, hf fp16 released before big2 "
                                           "(--neox-reference-first=always)")


def test_never_keeps_todays_behaviour(monkeypatch, on_cpu):
    session = make_session(monkeypatch, mode="never")
    reference = session.reference()
    session.backend("big")
    assert not isinstance(reference, ReferenceHandle) and type(reference) is StandInReference
    assert calls(session, "generate") == calls(session, "score") == calls(session, "close") == []
    assert session.reference_releases == []


@pytest.mark.parametrize("model,gpu,released", [("pythia-2.8b", "t4", True), ("pythia-1.4b", "t4", False),
                                                ("pythia-2.8b", "h100", False)])
def test_auto_decides_from_the_sizes(monkeypatch, fake_gpus, model, gpu, released):
    """On a T4 (15.8 GB): 2.8b needs (11.1 + 5.6 + 5.6) x 1.2 = 26.6 GB, 1.4b 13.6 GB; an H100 holds 2.8b."""
    fake_gpus(gpu)
    session = make_session(monkeypatch, model=model, mode="auto")
    session.reference()
    session.peer()
    session.backend("big")
    assert bool(calls(session, "close")) == released
    assert session.reference().loaded != released and session.peer().loaded != released
    if released:
        [line] = session.reference_releases
        # (scoring these three-token cases: 6 positions x 50304 x (2 + 4 + 4) B in each process)
        assert line == ("reference first: 3 cases precomputed, hf fp32 + fp16 released before big (needed "
                        "hf fp32 11.1 GB + hf fp16 5.6 GB + big fp16 5.6 GB, x 1.2 = 26.6 GB, + test process "
                        "runtime 0.759 GB + hf scoring 0.00302 GB + big scoring 0.00302 GB = 27.4 GB > 15.8 GB "
                        "of GPU 0)")
    else:
        assert session.reference_releases == [] and calls(session, "generate") == []


def test_after_a_release_for_memory_localisation_does_not_reload_the_reference(monkeypatch, fake_gpus):
    """Per-layer traces are not precomputed: reloading the fp32 reference for them beside the engine ran
    gpt-neox-20b's rank 0 out of memory on an H200 (82 GB reference + 41 GB peer + the engine's 33 GB)."""
    from pytest_neoxmii.checks.parity import localize
    fake_gpus("t4")
    session = make_session(monkeypatch, model="pythia-2.8b", mode="auto")
    session.backend("big")
    case = session.case(session.plans()[0])
    message = localize(session, session.backend("big"), case)
    assert message.startswith("localisation skipped: the HF reference was released so that the engine fits "
                              "beside it (reference first: 3 cases precomputed, hf fp32 + fp16 released before big")
    assert message.endswith("localise this case on a GPU that holds both, with --neox-reference-first=never")
    assert not session.reference().loaded and session.reference().reloads == 0
    always = make_session(monkeypatch, model="pythia-2.8b", mode="always")
    always.backend("big")
    assert always.reference_released_for_memory is None       # released by request, not for lack of memory


def test_auto_releases_nothing_on_a_cpu_that_holds_every_model(monkeypatch, on_cpu):
    from pytest_neoxmii import hardware
    monkeypatch.setattr(hardware, "host_memory_total", lambda: 2**40)    # a machine that holds 20b in fp32
    session = make_session(monkeypatch, model="gpt-neox-20b", mode="auto")
    session.reference()
    session.backend("big")
    assert calls(session, "close") == [] and session.reference_releases == []


def test_auto_releases_the_hf_models_before_an_engine_the_cpus_memory_does_not_hold_beside_them(monkeypatch,
                                                                                               on_cpu):
    """pythia-1b on a 9 GiB CPU machine: the HF models fit (4.0 + 2.0 GB, x 1.2, + one runtime: 7.7 GB), the
    engine beside them does not (10.1 GB: this stand-in keeps a copy of its own, in the test process). The
    three cases' scores (float32 over 50304 tokens, 9 positions in all, for 3 models; the largest twice) come on
    top."""
    from pytest_neoxmii import hardware
    monkeypatch.setattr(hardware, "host_memory_total", lambda: 9 * 2**30)
    session = make_session(monkeypatch, model="pythia-1b", mode="auto")
    session.reference()
    session.peer()
    assert calls(session, "close") == []
    session.backend("big")
    assert calls(session, "close") == [("close", "hf", "fp32"), ("close", "hf", "fp16")]
    assert session.log.index(("close", "hf", "fp16")) < session.log.index(("load", "big", "fp16"))
    assert session.reference_releases == [
        "reference first: 3 cases precomputed, hf fp32 + fp16 released before big (needed hf fp32 4.0 GB + "
        "hf fp16 2.0 GB + big fp16 2.0 GB, x 1.2 = 9.7 GB, + runtime of 1 process 0.367 GB + scores of 3 models "
        "0.00966 GB = 10.1 GB > 9.7 GB of host memory)"]


def test_a_cpu_that_does_not_hold_both_hf_models_loads_them_one_after_the_other(monkeypatch, on_cpu):
    """pythia-1b on a 6 GiB CPU machine (a 6.4 GB container: 7.7 GB needed for the two): every case's
    reference outputs with the fp32 model alone, then the peer's with the peer alone, each loaded once,
    whatever the tests ask first; then every lookup is cached."""
    from pytest_neoxmii import hardware
    monkeypatch.setattr(hardware, "host_memory_total", lambda: 6 * 2**30)
    session = make_session(monkeypatch, model="pythia-1b", mode="auto")
    session.stored_dtype = "fp16"                         # as the synthetic checkpoint's files say
    session.peer()                                        # a test asked the peer first
    assert [e for e in session.log if e[0] in ("load", "close")] == [
        ("load", "hf", "fp16"), ("close", "hf", "fp16"), ("load", "hf", "fp32"), ("close", "hf", "fp32"),
        ("load", "hf", "fp16")]
    # each model computed every case while the other was closed
    first_peer_call = next(i for i, e in enumerate(session.log) if e[0] != "load" and e[2] == "fp16")
    assert all(e[2] == "fp32" for e in session.log[3:first_peer_call] if e[0] in ("generate", "score"))
    assert len(calls(session, "score")) == 2 * len(PLANS)
    assert session.reference_releases == [
        "hf models one at a time (needed checkpoint pages (fp16, mapped by hf fp16) 2.0 GB + hf fp32 4.0 GB, "
        "x 1.2 = 7.3 GB, + runtime of 1 process 0.367 GB + scores of 2 models 0.00724 GB = 7.7 GB > 6.4 GB of "
        "host memory): 3 cases precomputed, one model after the other"]
    loads = len(calls(session, "load"))
    for plan in PLANS:
        case = session.case(plan)
        for backend in (session.reference(), session.peer()):
            if plan.generate:
                session.generation(backend, case)
            session.scores(backend, case)
    assert len(calls(session, "load")) == loads


def test_the_hf_models_side_by_side_where_the_cpu_holds_both(monkeypatch, on_cpu):
    from pytest_neoxmii import hardware
    monkeypatch.setattr(hardware, "host_memory_total", lambda: 9 * 2**30)
    session = make_session(monkeypatch, model="pythia-1b", mode="auto")
    session.peer()
    session.reference()
    assert session.log == [("load", "hf", "fp16"), ("load", "hf", "fp32")] and session.hf_one_at_a_time is None


@pytest.mark.parametrize("mode,dtype", [("never", "fp16"), ("auto", "fp32")])
def test_no_turns_without_releasable_models_or_without_a_peer(monkeypatch, on_cpu, mode, dtype):
    """--neox-reference-first=never keeps the models loaded, as asked; an fp32 session's peer is the reference."""
    from pytest_neoxmii import hardware
    monkeypatch.setattr(hardware, "host_memory_total", lambda: 6 * 2**30)
    session = make_session(monkeypatch, model="pythia-1b", mode=mode, dtype=dtype)
    session.reference()
    session.peer()
    assert calls(session, "close") == [] and session.hf_one_at_a_time is None


def test_a_need_and_a_memory_that_round_alike_are_shown_to_the_hundredth():
    """pythia-1b, the HF models and two engines of 0.4 GB runtime each beside 12 GiB: 12.94 GB needed, 12.88 GB
    there; shown to a tenth both would read 12.9 GB."""
    spec = lookup("pythia-1b")
    engines_ = [EngineOnGpu(n, "fp16", 1, 0, 400 * 10**6) for n in ("mii", "ds")]
    close = footprint(spec, "hf", "fp16", engines_, 12 * 2**30)
    assert not close.fits and close.arithmetic.endswith(" = 12.94 GB > 12.88 GB of GPU 0")
    assert footprint(spec, "hf", "fp16", engines_[:1], 12 * 2**30).arithmetic.endswith(
        " = 10.1 GB <= 12.9 GB of GPU 0")


def test_footprint_counts_an_fp32_peer_once_and_the_engine_share_per_gpu():
    spec = lookup("pythia-1b")
    fp32 = footprint(spec, "hf", "fp32", [EngineOnGpu("ds", "fp32", 2)], 85_045_870_592)
    weights = spec.weight_bytes("fp32") / 1e9
    assert fp32.fits and fp32.arithmetic == (f"hf fp32 {weights:.1f} GB + ds fp32 / tp=2 {weights / 2:.1f} GB, "
                                             f"x 1.2 = {weights * 1.5 * 1.2:.1f} GB <= 85.0 GB of GPU 0")


def test_footprint_counts_each_engine_as_the_registry_does_with_its_worker_runtime():
    """One memory model: an engine's share of GPU 0 is ModelSpec.per_gpu_bytes, the figure _check_fits uses
    ((weights / tp + workspace) x 1.2 + the worker's CUDA runtime), so reference first and prelaunch cannot
    put beside the reference an engine the registry would not deploy there."""
    from pytest_neoxmii.registry import DS_WORKSPACE_FREE_BYTES, WORKER_RUNTIME_BYTES
    spec = lookup("pythia-1b")
    workspace = spec.ds_workspace_bytes("fp16", 1, 2048, 4)
    engine = EngineOnGpu("ds", "fp16", 1, workspace, WORKER_RUNTIME_BYTES)
    need = ((spec.weight_bytes("fp32") + spec.weight_bytes("fp16")) * 1.2
            + spec.per_gpu_bytes("fp16", 1, workspace, WORKER_RUNTIME_BYTES) + DS_WORKSPACE_FREE_BYTES)
    assert footprint(spec, "hf", "fp16", [engine], math.ceil(need)).fits
    short = footprint(spec, "hf", "fp16", [engine], math.floor(need))
    assert not short.fits
    # (a byte apart: shown in bytes)
    assert short.arithmetic.endswith(f", + ds runtime {WORKER_RUNTIME_BYTES / 1e9:.3g} GB + DeepSpeed's free "
                                     f"reserve 0.524 GB = {math.ceil(need)} bytes > {math.floor(need)} bytes of GPU 0")
    # the runtime is added after the margin, not multiplied by it
    without = footprint(spec, "hf", "fp16", [engine._replace(runtime_bytes=0)], math.floor(need))
    assert without.fits is (need - WORKER_RUNTIME_BYTES <= math.floor(need))


def test_footprint_counts_the_test_process_and_deepspeeds_free_reserve_and_leaves_out_released_models():
    """On one H200 with all but 5.0 GiB held by another job, pythia-160m: mii failed to load beside ds once the
    HF models were released, where the sum said 4.5 GB <= 5.4 GB. Left out were the test process's own runtime
    (724 MiB, kept after the release) and the 500 MiB DeepSpeed's workspace wants free beyond it. Both count
    now (the reserve once, and only where an engine has a workspace), and released HF models do not."""
    from pytest_neoxmii.registry import WORKER_RUNTIME_BYTES, TEST_PROCESS_RUNTIME_BYTES
    spec = lookup("pythia-160m")
    workspace = spec.ds_workspace_bytes("fp16", 1, 2048, 4)
    ds, mii = (EngineOnGpu(n, "fp16", 1, workspace, WORKER_RUNTIME_BYTES) for n in ("ds", "mii"))
    gpu = int(5.0 * 2**30)
    need = footprint(spec, "hf", "fp16", [mii, ds], gpu, hf_loaded=False,
                     test_process_runtime=TEST_PROCESS_RUNTIME_BYTES)
    assert not need.fits and need.arithmetic == (
        "mii fp16 0.325 GB + mii workspace 0.83 GB + ds fp16 0.325 GB + ds workspace 0.83 GB, x 1.2 = 2.8 GB, "
        "+ test process runtime 0.759 GB + mii runtime 0.847 GB + ds runtime 0.847 GB + DeepSpeed's free reserve "
        "0.524 GB = 5.8 GB > 5.4 GB of GPU 0")
    alone = footprint(spec, "hf", "fp16", [mii], gpu, hf_loaded=False, test_process_runtime=TEST_PROCESS_RUNTIME_BYTES)
    assert alone.fits and "hf" not in alone.arithmetic
    zero = footprint(spec, "hf", "fp16", [EngineOnGpu("zero", "fp16", 1, 0, WORKER_RUNTIME_BYTES)], gpu)
    assert "reserve" not in zero.arithmetic and "test process" not in zero.arithmetic and "hf fp32" in zero.arithmetic


def test_a_bad_mode_is_a_one_line_usage_error(pytester, assert_usage_error):
    assert_usage_error(pytester.runpytest("--neox-reference-first=sometimes"),
                       "--neox-reference-first must be 'auto', 'always' or 'never', got 'sometimes'")


def test_a_peer_that_cannot_load_stops_the_precompute_not_the_engine(monkeypatch, on_cpu):
    from pytest_neoxmii.errors import BackendUnavailable
    session = make_session(monkeypatch)
    load = session.load

    def refuse_the_peer(name, dtype):
        if dtype == "fp16" and engines.is_reference(name):
            raise BackendUnavailable("no fp16 here")
        return load(name, dtype)
    monkeypatch.setattr(session, "load", refuse_the_peer)
    assert session.backend("big").info.backend == "big"
    assert session.unavailable == {"hf:fp16": "hf (fp16): no fp16 here"}
    # the fp32 reference's outputs come first, every case's, then the peer's (which stop at once)
    assert [e[2] for e in session.log if e[0] in ("generate", "score")] == ["fp32"] * 5
    assert session.reference_releases == ["reference first: 3 cases precomputed, hf fp32 released before big "
                                          "(--neox-reference-first=always); precompute stopped: hf (fp16): "
                                          "no fp16 here"]


def test_a_reload_inside_a_model_call_is_counted_once(monkeypatch):
    """The phases of the summary add up to no more than the session: the released reference reloaded inside
    a model call counts as model load, and is taken out of the model call (measured before: gpt-neox-20b's
    phases summed to 352 s of a 338 s session)."""
    from pytest_neoxmii import session as session_module
    session = make_session(monkeypatch, model="pythia-2.8b", mode="auto")
    now = iter([0.0, 1.0, 4.0, 10.0])            # calls opens, load opens, load closes, calls closes
    monkeypatch.setattr(session_module.time, "perf_counter", lambda: next(now))
    before = dict(session.timings)
    with session.timed("model calls"):
        with session.timed("model load"):
            pass
    assert session.timings["model load"] - before["model load"] == 3.0
    assert session.timings["model calls"] - before["model calls"] == 7.0


def test_loading_the_tokenizer_counts_as_model_load(monkeypatch):
    """The tokenizer is the model's own (loaded from its directory), and its first load imports transformers:
    on one H200 that was 3.7 s of a warm session's first test, counted as plugin overhead before."""
    import transformers

    from pytest_neoxmii import session as session_module
    session = make_session(monkeypatch)
    clock = [100.0]
    monkeypatch.setattr(session_module.time, "perf_counter", lambda: clock[0])
    loads = []

    def from_pretrained(path):
        loads.append(path)
        clock[0] += 2.5                          # the load takes 2.5 s of the session
        return "tokenizer"
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    before = dict(session.timings)
    assert session.tokenizer == "tokenizer" and session.tokenizer == "tokenizer"
    assert loads == ["unused"]                   # loaded once, from the model's directory
    assert session.timings["model load"] - before.get("model load", 0.0) == 2.5
    assert {k: v for k, v in session.timings.items() if k != "model load"} == \
        {k: v for k, v in before.items() if k != "model load"}


def test_auto_counts_the_engines_already_on_the_gpu(monkeypatch, fake_gpus):
    """T4 (15.8 GB), pythia-1.4b: hf fp32 5.7 + fp16 2.8 + one engine 2.8 GB fits (x 1.2 = 13.6 GB); with the
    first engine still deployed beside the second it does not (x 1.2 = 17.0 GB)."""
    fake_gpus("t4")
    monkeypatch.setitem(engines.ENGINES, "big2", engines.Engine("big2", GpuEngine))
    session = make_session(monkeypatch, model="pythia-1.4b", mode="auto")
    session.options = dataclasses.replace(session.options, backends=("hf", "big", "big2"))
    session.reference()
    session.backend("big")
    assert calls(session, "close") == [] and session.reference_releases == []
    session.backend("big2")
    assert calls(session, "close") == [("close", "hf", "fp32"), ("close", "hf", "fp16")]
    [line] = session.reference_releases
    assert line.startswith("reference first: 3 cases precomputed, hf fp32 + fp16 released before big2 (needed "
                           "hf fp32 5.7 GB + hf fp16 2.8 GB + big2 fp16 2.8 GB + big fp16 2.8 GB, x 1.2 = ")
    assert line.endswith(" > 15.8 GB of GPU 0)")


def test_engines_take_turns_on_a_gpu_that_does_not_hold_them_together(monkeypatch, fake_gpus):
    """T4 (15.8 GB), pythia-2.8b, three engines of 5.6 GB each: the HF models go first (reference first), two
    engines fit beside each other (13.4 GB x 1.2 with the test process's runtime: 14.2 GB), a third does not,
    so the two deployed are closed before it loads; one asked for again later deploys again, in its turn.
    Without turns the third loaded into memory the others held (mii beside ds, on one H200 shared with another
    job)."""
    fake_gpus("t4")
    for name in ("big2", "big3"):
        monkeypatch.setitem(engines.ENGINES, name, engines.Engine(name, GpuEngine))
    session = make_session(monkeypatch, model="pythia-2.8b", mode="auto")
    session.options = dataclasses.replace(session.options, backends=("hf", "big", "big2", "big3"))
    session.reference()
    first, second = session.backend("big"), session.backend("big2")
    assert calls(session, "close") == [("close", "hf", "fp32"), ("close", "hf", "fp16")] and session.turns == []
    session.backend("big3")
    assert calls(session, "close")[2:] == [("close", "big", "fp16"), ("close", "big2", "fp16")]
    assert session.took_turns == {"big:fp16": first, "big2:fp16": second}
    [line] = session.turns
    assert line.startswith("big:fp16, big2:fp16 closed before big3:fp16 deployed (needed big3 fp16 5.6 GB + "
                           "big fp16 5.6 GB + big2 fp16 5.6 GB, x 1.2 = 20.0 GB, + test process runtime 0.759 GB")
    assert line.endswith(" > 15.8 GB of GPU 0)") and "hf fp32" not in line
    session.backend("big")              # a later test asks for it again: it fits beside big3, which stays
    assert calls(session, "load").count(("load", "big", "fp16")) == 2 and len(calls(session, "close")) == 4
    session.backend("big2")             # the third again: both deployed make way
    assert calls(session, "close")[4:] == [("close", "big3", "fp16"), ("close", "big", "fp16")]
    assert session.turns[1].startswith("big3:fp16, big:fp16 closed before big2:fp16 deployed")


class WorkerEngine(GpuEngine):
    runs_in_worker = True


def test_a_gpu_that_takes_engines_one_at_a_time_gets_the_test_process_cache_back(monkeypatch, fake_gpus):
    """Where prelaunch declined (the engines do not fit at once), torch's cached blocks go back to the driver
    after each call of a model in the test process: on one H200 with 5.0 GiB free the test process held
    2.78 GiB, 1.1 GiB more than its runtime and the HF weights, while ds ran out of memory. Not after a
    worker's call (its cache is its own), and not where everything fits."""
    import torch
    fake_gpus("t4")
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    session = make_session(monkeypatch, mode="never")
    case = session.case(PLANS[0])
    session.scores(session.reference(), case)
    assert emptied == []                                  # everything fits: nothing to give back
    session.engines_one_at_a_time = "engines deployed one at a time ..."
    session.scores(session.peer(), case)
    assert emptied == [1]
    session.scores(WorkerEngine("big", "fp16", session.log), case)
    assert calls(session, "score")[-1] == ("score", "big", "fp16") and emptied == [1]   # a worker's own cache


class KernelEngine(GpuEngine):
    """An engine that injects DeepSpeed's kernels: its inference workspace counts beside its weights."""
    injects_kernels = True


def test_auto_counts_deepspeeds_workspace_of_an_engine_that_injects_kernels(monkeypatch, fake_gpus):
    """T4 (15.8 GB), pythia-1.4b, cases of up to 2048 tokens at batch 4: the weights alone fit (13.6 GB,
    as above), but an injecting engine's workspace adds 2.5 GB (ModelSpec.ds_workspace_bytes) and then
    they do not; an engine without kernels at the same size still deploys beside the reference."""
    fake_gpus("t4")
    monkeypatch.setitem(engines.ENGINES, "bigk", engines.Engine("bigk", KernelEngine))
    monkeypatch.setattr(NeoxSession, "max_tokens", property(lambda self: 2048))
    monkeypatch.setattr(NeoxSession, "max_batch", property(lambda self: 4))
    session = make_session(monkeypatch, model="pythia-1.4b", mode="auto")
    session.options = dataclasses.replace(session.options, backends=("hf", "big", "bigk"))
    assert session.workspace_bytes("big") == 0
    assert session.workspace_bytes("bigk") == lookup("pythia-1.4b").ds_workspace_bytes("fp16", 1, 2048, 4)
    session.reference()
    session.backend("big")
    assert session.reference_releases == []
    session.close_backend("big")
    session.backend("bigk")
    [line] = session.reference_releases
    assert line.startswith("reference first: 3 cases precomputed, hf fp32 + fp16 released before bigk (needed "
                           "hf fp32 5.7 GB + hf fp16 2.8 GB + bigk fp16 2.8 GB + bigk workspace 2.5 GB, x 1.2 = ")


def test_no_workspace_is_counted_on_the_cpu(monkeypatch, on_cpu):
    monkeypatch.setitem(engines.ENGINES, "bigk", engines.Engine("bigk", KernelEngine))
    session = make_session(monkeypatch, model="pythia-1.4b", mode="auto")
    assert session.workspace_bytes("bigk") == 0


class OutOfMemoryError(RuntimeError):
    """What torch raises (torch.OutOfMemoryError), by name."""


def test_a_model_out_of_gpu_memory_fails_its_test_in_one_line(monkeypatch, on_cpu):
    """Measured on pythia-12b (one H200): the reference ran out of memory inside the session; the test then
    showed a traceback through session.py. Now one line: the model, the call and the case, what CUDA said."""
    session = make_session(monkeypatch, mode="never")
    case = session.case(PLANS[0])

    def full(self, batch):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 66.00 MiB. GPU 0 has a total capacity of "
                               "139.80 GiB of which 52.38 MiB is free. Including non-PyTorch memory, this "
                               "process has 67.03 GiB memory in use.")
    monkeypatch.setattr(StandInReference, "score", full)
    with pytest.raises(pytest.fail.Exception) as info:
        session.scores(session.reference(), case)
    assert str(info.value) == ("hf (fp32) ran out of GPU memory in score(batch of 1 row, lengths 3) of case "
                               "short-b1-len3: CUDA out of memory. Tried to allocate 66.00 MiB. GPU 0 has a total "
                               "capacity of 139.80 GiB of which 52.38 MiB is free")
    monkeypatch.setattr(StandInReference, "score", lambda self, batch: 1 / 0)
    with pytest.raises(ZeroDivisionError):                 # anything else is not this rule's business
        session.scores(session.reference(), case)


# -- the host-memory fit of a CPU session (host_footprint) ----------------------------------------------------

def test_host_footprint_counts_the_checkpoints_pages_once_and_a_copy_apiece():
    """pythia-1b stored in fp16, an fp16 session, all engines side by side (measured on the 2-core Xeon: 9.3 GB
    at the peak): the peer, ds and mii map the file; the fp32 reference and ZeRO's partitions are copies; the
    test process, three workers and their fork server hold a runtime each."""
    from pytest_neoxmii.reference_first import EngineInHost, host_footprint
    deployed = [EngineInHost("ds", "fp16", True), EngineInHost("mii", "fp16", True),
                EngineInHost("zero", "fp16", False)]
    need = host_footprint(lookup("pythia-1b"), "hf", "fp16", True, deployed, "fp16", 12 * 2**30)
    assert need.arithmetic == ("checkpoint pages (fp16, mapped by hf fp16, ds fp16, mii fp16) 2.0 GB + hf fp32 "
                               "4.0 GB + zero fp16 2.0 GB, x 1.2 = 9.7 GB, + runtime of 5 processes 1.8 GB = "
                               "11.5 GB <= 12.9 GB of host memory")
    assert need.fits
    assert not host_footprint(lookup("pythia-1b"), "hf", "fp16", True, deployed, "fp16", 6 * 2**30).fits


@pytest.mark.parametrize("peer,stored", [("bf16", "fp16"), ("fp16", None)])
def test_host_footprint_counts_a_model_not_in_the_stored_dtype_as_a_copy(peer, stored):
    """A bf16 session of an fp16 checkpoint converts every model; a checkpoint of unknown dtype maps nothing
    for certain: each model then counts in full."""
    from pytest_neoxmii.reference_first import EngineInHost, host_footprint
    need = host_footprint(lookup("pythia-1b"), "hf", peer, True, [EngineInHost("ds", peer, True)], stored,
                          16 * 2**30)
    assert need.arithmetic == (f"hf fp32 4.0 GB + hf {peer} 2.0 GB + ds {peer} 2.0 GB, x 1.2 = 9.7 GB, + runtime "
                               f"of 3 processes 1.1 GB = 10.8 GB <= 17.2 GB of host memory")


def test_the_scores_the_test_process_keeps_count_per_scoring_model_whatever_the_model_size():
    """The default cases' float32 scores over Pythia's 50304-token vocabulary: 0.58 GB a model, and the
    2016-token case's logits and log-softmax (0.81 GB) while they are computed: pythia-410m's fp32 reference
    (1.62 GB) in a 3 GiB container was killed by the OOM killer computing them."""
    from pytest_neoxmii.cases import plan_cases
    from pytest_neoxmii.reference_first import EngineInHost, host_footprint, kept_scores_bytes
    plans = plan_cases(2048, 32, "default")
    kept, in_making = kept_scores_bytes(plans, 50304, 2048)
    tokens = 332 + 4 + 16 + 128 + 4 * 32 + 4 * 64 + 2016     # the fixed text's 332 words, then each case padded
    assert (kept, in_making) == (tokens * 50304 * 4, 2 * 2016 * 50304 * 4)
    need = host_footprint(lookup("pythia-410m"), "hf", "fp16", True,
                          [EngineInHost("ds", "fp16", True), EngineInHost("mii", "fp16", True, scores=False)],
                          "fp16", 3 * 2**30, (kept, in_making))
    assert need.arithmetic == ("checkpoint pages (fp16, mapped by hf fp16, ds fp16, mii fp16) 0.811 GB + hf fp32 "
                               "1.6 GB, x 1.2 = 2.9 GB, + runtime of 4 processes 1.5 GB + scores of 3 models 2.5 GB "
                               "= 6.9 GB > 3.2 GB of host memory")      # hf fp32, hf fp16 and ds score; mii not
    assert kept_scores_bytes([], 50304, 2048) == (0, 0)


def test_scoring_the_longest_case_counts_its_logits_their_float32_copy_and_the_log_softmax():
    """pythia-160m's default cases: the 2016-token case's float32 log-softmax is 2016 x 50304 x 4 B = 0.41 GB
    (the 388 MiB ds could not allocate on a nearly full H200). An fp16 model's logits, their float32 copy and the
    log-softmax are side by side in TorchModelBackend.score: 2.5 of those; an fp32 model's logits are their own
    copy: 2."""
    plans = plan_cases(2048, 32)
    one = 2016 * 50304 * 4
    assert math.ceil(one / 2**20) == 387
    assert scoring_bytes(plans, 50304, 2048, "fp16") == scoring_bytes(plans, 50304, 2048, "bf16") == one * 5 // 2
    assert scoring_bytes(plans, 50304, 2048, "fp32") == one * 2
    assert scoring_bytes([p for p in plans if p.family != "long"], 50304, 2048, "fp32") < one / 2
    assert scoring_bytes([], 50304, 2048, "fp16") == 0


def test_the_footprint_counts_each_model_scoring_where_it_scores():
    """Each engine worker scores on its own GPU memory, and the test process while the HF models are loaded
    (once: they score one after the other); released, they score nothing."""
    spec = lookup("pythia-160m")
    engine = EngineOnGpu("ds", "fp16", 1, 0, 0, 10**9)
    loaded = footprint(spec, "hf", "fp16", [engine], 150 * 10**9, hf_scoring=2 * 10**9)
    assert loaded.arithmetic.endswith(", + hf scoring 2.0 GB + ds scoring 1.0 GB = 4.6 GB <= 150.0 GB of GPU 0")
    released = footprint(spec, "hf", "fp16", [engine], 150 * 10**9, hf_loaded=False, hf_scoring=2 * 10**9)
    assert "hf" not in released.arithmetic and released.arithmetic.endswith(", + ds scoring 1.0 GB = 1.4 GB "
                                                                             "<= 150.0 GB of GPU 0")
    assert footprint(spec, "hf", "fp16", [engine._replace(scoring_bytes=0)], 150 * 10**9,
                     hf_loaded=False).arithmetic == "ds fp16 0.325 GB, x 1.2 = 0.39 GB <= 150.0 GB of GPU 0"


def test_engines_take_turns_where_scoring_the_longest_case_does_not_fit_beside_them(monkeypatch, fake_gpus):
    """One H200 with 5.0 GiB free beside another job, pythia-160m: counted by their weights (x 1.2) and runtimes,
    three engine workers fit together (3 x 1.24 GB + the test process's 0.76 GB = 4.5 GB of 5.4 GB), and such
    engines were deployed side by side there: ds ran out of memory allocating the 2016-token case's float32
    logits (388 MiB) beside zero's worker and the test process (docs/speed-round27). Scoring that case holds
    1.01 GB in each worker: two fit (5.3 GB), the third takes its turn."""
    hw = fake_gpus("h100")
    session = make_session(monkeypatch, model="pythia-160m", mode="never")
    for name in ("big", "big2", "big3"):
        monkeypatch.setitem(engines.ENGINES, name, engines.Engine(name, WorkerEngine))
    session.options = dataclasses.replace(session.options, backends=("hf", "big", "big2", "big3"))
    session.selected_plans = plan_cases(2048, 32)
    session.gpu_memory_in_use = {0: hw.gpus[0].total_memory - 5 * 2**30}
    session.backend("big")
    session.backend("big2")
    assert session.turns == []
    session.backend("big3")
    assert calls(session, "close") == [("close", "big", "fp16"), ("close", "big2", "fp16")]
    [line] = session.turns
    assert line.startswith("big:fp16, big2:fp16 closed before big3:fp16 deployed (needed big3 fp16 0.325 GB + ")
    assert "+ big3 runtime 0.847 GB + big3 scoring 1.0 GB + big runtime" in line
    assert line.endswith(" = 7.5 GB > 5.4 GB of GPU 0)")


@pytest.mark.parametrize("gpu, backends, turns", [("t4", ("hf", "big", "big2"), True),
                                                  ("h100", ("hf", "big", "big2"), False),
                                                  ("t4", ("hf", "big"), False),
                                                  (None, ("hf", "big", "big2"), False)],
                         ids=["t4-two-engines", "h100", "t4-one-engine", "cpu"])
def test_collection_knows_whether_the_engines_will_take_turns(monkeypatch, fake_gpus, gpu, backends, turns):
    """pythia-2.8b: two engines beside each other (and the HF models) do not fit a T4 (15.8 GB), they fit an
    H100; one engine never takes turns, nor does a CPU session. Only the engines the selected tests deploy
    count (NeoxSession._engines_asked)."""
    fake_gpus(*([gpu] if gpu else []))
    monkeypatch.setitem(engines.ENGINES, "big2", engines.Engine("big2", GpuEngine))
    session = make_session(monkeypatch, model="pythia-2.8b", mode="auto")
    session.options = dataclasses.replace(session.options, backends=backends)

    def test_of(engine):
        return SimpleNamespace(fixturenames=["neox"], callspec=SimpleNamespace(params={"neox_backend_name": engine}),
                               get_closest_marker=lambda name: None)
    assert session.engines_take_turns([test_of(n) for n in backends]) is turns
    assert session.engines_take_turns([test_of("hf"), test_of("big")]) is False    # big2 deployed by no test

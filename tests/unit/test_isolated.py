"""Isolated engines (backends/isolated.py, pytest_neoxmii/worker.py): an engine class loaded in a worker
process of its own behind the same interface, its load failures turned into the session's outcomes (skip,
injection failure, deployment error), its death mid-request a crash naming the signal, the request and its
log, its latency timed inside the worker, and nothing left behind. Stand-in engines: engines_for_workers.py."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import threading
import time
import warnings
from pathlib import Path

import pytest

from pytest_neoxmii.backends.base import LoadRequest
from pytest_neoxmii.backends.isolated import IsolatedEngine
from pytest_neoxmii.deploy import forkserver, processes
from pytest_neoxmii.errors import BackendUnavailable
from pytest_neoxmii.injection import InjectionFailed
from pytest_neoxmii.outputs import PromptBatch
from tests.unit import engines_for_workers as stand_ins

BATCH = PromptBatch(rows=((5, 6), (9,)))


def request_for(path: Path, device: str = "cpu") -> LoadRequest:
    return LoadRequest(path=path, dtype="fp32", device=device, max_tokens=64)


def deploy(cls, tmp_path, **kw) -> IsolatedEngine:
    return IsolatedEngine("echo", cls, request_for(tmp_path), memory_probe=None, ready_timeout=120, **kw)


def test_an_isolated_engine_answers_from_its_own_process_and_is_torn_down(tmp_path):
    (tmp_path / "echo-markers").mkdir()
    engine = deploy(stand_ins.EchoEngine, tmp_path)
    try:
        pids = engine._trees[0].pids()
        assert engine.generate(BATCH, 3).tokens == [[6, 6, 6], [9, 9, 9]]
        assert engine.score(PromptBatch(rows=((1, 2, 3),))).logprobs.shape == (1, 3, 3)
        notes = engine.info.notes
        worker_pid = int(notes[0].split()[1])
        assert worker_pid != os.getpid() and worker_pid in pids
        assert f"in worker process {worker_pid}" in notes and notes[-1].startswith("deployed in ")
        assert engine.runs_in_worker and engine.can_score and not engine.output_is_text
    finally:
        engine.close()
    assert (tmp_path / "echo-markers" / f"closed-{worker_pid}").read_text() == "closed"     # the worker closed its engine
    assert not [p for p in pids if processes.alive(p)]
    assert processes.tagged(engine.tag) == set()
    assert engine.teardown_report is not None and not engine.teardown_report.leaked
    with pytest.raises(processes.DeploymentError, match="echo tp=1 deployment is closed"):
        engine.generate(BATCH, 1)


@pytest.mark.skipif(forkserver.gpus_present(), reason="needs a machine without GPUs, found GPUs: there every "
                    "worker is started by exec (deploy/forkserver.py)")
def test_a_forked_worker_finds_its_engines_imports_done_and_no_other_engines(tmp_path, own_fork_server):
    engines = [deploy(stand_ins.EchoEngine, tmp_path), deploy(stand_ins.ImportsDeepSpeed, tmp_path)]
    try:
        echo, needs_ds = (e.info.notes for e in engines)
        assert "forked from the session's fork server" in echo and "deepspeed imported: False" in echo, echo
        assert "forked from the session's fork server" in needs_ds and "deepspeed imported: True" in needs_ds, needs_ds
    finally:
        for engine in engines:
            engine.close()


def test_a_launched_worker_says_when_it_was_ready_not_when_it_was_first_asked(tmp_path):
    """A worker launched ahead (prelaunch) is often ready long before a test needs it: 'deployed in' is the
    worker's own ready time (one monotonic clock for the machine), not the time the session came to ask."""
    (tmp_path / "echo-markers").mkdir()
    engine = deploy(stand_ins.EchoEngine, tmp_path, wait=False)
    try:
        log = engine._trees[0].log_path
        deadline = time.monotonic() + 120
        while ": ready:" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        asked_at = time.monotonic()
        engine.wait_ready()
        assert engine._launched_at < engine.ready_at < asked_at
        assert engine.deploy_seconds == pytest.approx(engine.ready_at - engine._launched_at)
        assert engine.deploy_seconds < asked_at - engine._launched_at - 0.9
        start = engine.deploy_seconds - engine.load_s            # (the stand-in builds no kernels)
        assert (f"deployed in {engine.deploy_seconds:.1f} s (start and imports {start:.1f} s, load "
                f"{engine.load_s:.1f} s)") in engine.info.notes
    finally:
        engine.close()


def test_deployments_asked_to_exit_first_wind_down_side_by_side(tmp_path):
    """The session asks every worker to exit before it closes any: each exits on its own, and close() then
    only collects it (nothing left to stop or signal)."""
    (tmp_path / "echo-markers").mkdir()
    engines = [deploy(stand_ins.EchoEngine, tmp_path) for _ in range(2)]
    try:
        for engine in engines:
            engine.ask_to_exit()
        deadline = time.monotonic() + 60
        while any(e._trees[0].popen.poll() is None for e in engines) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e._trees[0].popen.poll() for e in engines] == [0, 0]     # exited by themselves
    finally:
        for engine in engines:
            engine.close()
    for engine in engines:
        report = engine.teardown_report
        assert report.polite == "none" and not report.leaked and not report.survivors, report.describe()


@pytest.mark.parametrize("cls, error, message", [
    (stand_ins.Unavailable, BackendUnavailable, "stand-in engine: cannot run here, on purpose"),
    (stand_ins.InjectsNothing, InjectionFailed, "DeepSpeed injected 0/6 layers"),
    (stand_ins.FailsToLoad, processes.DeploymentError, "failed on purpose while loading"),
    (stand_ins.CheckpointDoesNotLoad, processes.DeploymentError,
     "transformers could not load '/models/x': RuntimeError: size mismatch (stand-in)"),
])
def test_a_load_failure_in_the_worker_is_the_sessions_outcome_for_it(tmp_path, cls, error, message):
    t0 = time.monotonic()
    with pytest.raises(error) as info:
        deploy(cls, tmp_path)
    assert message in str(info.value)
    assert time.monotonic() - t0 < 60
    assert not processes.live()                                     # nothing registered, nothing running
    if cls is stand_ins.FailsToLoad:                                # the traceback and the log come with it
        assert "echo tp=1: the engine failed to load in its worker" in str(info.value)
        assert "RuntimeError" in str(info.value) and "worker.log" in str(info.value)
    if cls is stand_ins.CheckpointDoesNotLoad:                      # a failure that says it all: one line
        assert re.fullmatch(rf"echo tp=1: {re.escape(message)} \(worker log: \S+/worker\.log\)", str(info.value))


def test_a_deployment_whose_start_failed_fails_the_same_way_when_asked_again(tmp_path):
    # A helper sharing ZeRO's calls, asked again by the latency tests' settle() after its load had failed,
    # raised OSError("handle is closed") from its closed channel in every latency test (one H200).
    engine = deploy(stand_ins.FailsToLoad, tmp_path, wait=False)
    with pytest.raises(processes.DeploymentError, match="failed on purpose while loading") as first:
        engine.wait_ready()
    with pytest.raises(processes.DeploymentError, match="failed on purpose while loading") as again:
        engine.wait_ready()
    assert again.value is first.value and not processes.live()


@pytest.mark.parametrize("cls, message", [
    (stand_ins.RefusedBeforeStart, "stand-in engine: refused before any process starts"),
    (stand_ins.NeedsAMissingPackage, "the 'a_package_that_is_not_installed_anywhere' package is not "
                                     "installed here"),
])
def test_what_the_test_process_can_tell_is_refused_before_a_worker_starts(tmp_path, cls, message, monkeypatch):
    started = []
    monkeypatch.setattr(processes, "start", lambda *a, **k: started.append(a))
    with pytest.raises(BackendUnavailable, match=message):
        deploy(cls, tmp_path)
    assert started == []


def test_a_worker_aborting_mid_request_is_a_crash_naming_signal_request_and_log(tmp_path):
    engine = deploy(stand_ins.AbortsInGenerate, tmp_path)
    try:
        pids = engine._trees[0].pids()
        t0 = time.monotonic()
        with pytest.raises(processes.WorkerCrashed) as info:
            engine.generate(BATCH, 3)
        assert time.monotonic() - t0 < 10
        message = str(info.value)
        assert message.startswith("echo tp=1: worker crashed (killed by SIGABRT) during "
                                  "generate(batch of 2 rows, lengths 2/1, 3 new tokens); last lines of ")
        assert "stand-in engine: os.abort() in generate" in message
    finally:
        engine.close()
    assert not [p for p in pids if processes.alive(p)]


def test_latency_is_timed_in_the_worker_and_reaches_pytest_benchmark(tmp_path):
    from pytest_neoxmii.latency import StopRule, measure_backend

    class Benchmark:                      # the two private names into_benchmark uses
        def __init__(self):
            self.samples = []

        def _make_stats(self, _):
            bench = self

            class Stats:
                def update(self, value):
                    bench.samples.append(value)
            return Stats()

    engine = deploy(stand_ins.EchoEngine, tmp_path)
    try:
        calls = []
        engine.generate = lambda *a: calls.append(a)     # the channel's generate must not be what is timed
        bench = Benchmark()
        result = measure_backend(engine, BATCH, 4, StopRule(min_rounds=7, max_rounds=7), 1, benchmark=bench)
    finally:
        engine.close()
    assert calls == []
    assert result.rounds == 7 and len(result.e2e) == 7 and result.stop_reason == "fixed"
    assert bench.samples == result.e2e
    assert result.backend == "echo" and result.batch_size == 2 and result.new_tokens == 4


def test_calls_given_ahead_are_computed_after_the_load_and_handed_over_once(tmp_path):
    other = PromptBatch(rows=((7, 8, 9),))
    ahead = [("generate", (BATCH, 3, 5)), ("generate", (other, 2, 5)), ("score", (other,))]
    engine = deploy(stand_ins.NumbersItsCalls, tmp_path, ahead=ahead)
    try:
        report = engine.wait_ahead()
        assert report["calls"] == 3 and report["computed"] == 3 and report["seconds"] >= 0
        assert report["unclaimed"] == 3
        assert engine.ahead_finished
        assert engine.generate(other, 2).tokens == [[2, 2]]            # the second call, made ahead
        assert engine.generate(BATCH, 3).tokens == [[1] * 3, [1] * 3]   # the first
        assert engine.generate(BATCH, 3).tokens == [[3] * 3, [3] * 3]   # handed over once: computed now
        assert engine.generate(BATCH, 3, 4).tokens == [[4] * 3, [4] * 3]  # other arguments, another call
        assert engine.score(other).logprobs.shape == (1, 3, 3)
        assert engine.wait_ahead(again=True)["unclaimed"] == 0           # every result was handed over
    finally:
        engine.close()


def test_a_result_worked_ahead_is_handed_over_while_later_calls_are_still_computed(tmp_path):
    """The first call's result comes back while the second call is still running ahead (it waits for the
    test's go): a test does not wait for the whole work ahead, only for what it asks."""
    (tmp_path / "echo-markers").mkdir()
    other = PromptBatch(rows=((7, 8, 9),))
    engine = deploy(stand_ins.SecondCallWaits, tmp_path, ahead=[("generate", (BATCH, 3, 5)),
                                                                 ("generate", (other, 2, 5))],
                    request_timeout=60)
    try:
        assert engine.generate(BATCH, 3).tokens == [[1] * 3, [1] * 3]       # the first call, made ahead
        assert "working ahead: generate(batch of 1 row" in engine._trees[0].log_path.read_text()
        # how far it got, at once (what a session ending asks: it never waits for the rest)
        so_far = engine.ahead_so_far()
        assert (so_far["calls"], so_far["computed"], so_far["finished"]) == (2, 1, False)
        assert not engine.ahead_finished
        (tmp_path / "echo-markers" / "go").write_text("")
        assert engine.generate(other, 2).tokens == [[2, 2]]                 # the second, made ahead too
        report = engine.wait_ahead(again=True)
        assert (report["calls"], report["computed"], report["unclaimed"], report["finished"]) == (2, 2, 0, True)
        assert engine.ahead_finished
        assert "worked ahead: 2/2 calls in" in engine._trees[0].log_path.read_text()
    finally:
        engine.close()


def test_a_call_that_fails_ahead_is_left_for_the_sessions_own_request(tmp_path):
    fails_first = PromptBatch(rows=((13, 1),))
    engine = deploy(stand_ins.NumbersItsCalls, tmp_path, ahead=[("generate", (fails_first, 2, 5))])
    try:
        assert engine.wait_ahead()["computed"] == 0
        assert engine.generate(fails_first, 2).tokens == [[2, 2]]     # asked again: the second call
    finally:
        engine.close()


def test_a_crash_while_working_ahead_says_so_and_names_the_call_in_its_log(tmp_path):
    engine = deploy(stand_ins.AbortsInGenerate, tmp_path, ahead=[("generate", (BATCH, 3, 5))])
    try:
        with pytest.raises(processes.WorkerCrashed) as info:
            engine.score(BATCH)
        message = str(info.value)
        assert "worker crashed (killed by SIGABRT) during score(batch of 2 rows, lengths 2/1)" in message
        assert "still running the session's calls ahead" in message
        assert "working ahead: generate(batch of 2 rows, lengths 2/1, 3 new tokens)" in message
    finally:
        engine.close()


ISOLATION_TESTS = """
import sys

def test_every_deepspeed_engine_answers(neox):
    case = neox.case(next(p for p in neox.plans() if p.generate))
    for name in ("ds", "mii", "zero"):
        backend = neox.backend(name)
        assert backend.runs_in_worker, name
        assert neox.generation(backend, case).tokens

def test_the_test_process_never_imported_deepspeed_or_mii():
    imported = sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "mii"))
    assert imported == []
"""


def test_the_test_process_never_imports_deepspeed_or_mii(pytester, synthetic_14m, monkeypatch, tmp_path,
                                                         on_the_cpu):
    """The real engines on synthetic pythia-14m (CPU), each in its worker; the session's own process never
    imports either package, so DeepSpeed's process-wide state and aborts stay in the workers. Their
    one-process worlds compile nothing: an empty TORCH_EXTENSIONS_DIR stays empty (DeepSpeed would build its
    shared-memory allreduce there, 23-62 s on two cores)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("mii")
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    pytester.makepyfile(test_isolation=ISOLATION_TESTS)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest_subprocess(*args, "--neox-backends=ds,mii,zero")
    result.assert_outcomes(passed=2)
    built = sorted(p.name for p in extensions.iterdir()) if extensions.exists() else []
    assert built == [], f"DeepSpeed compiled {built} for one-process engines on the CPU"


PRELAUNCH_CONFTEST = """
from pytest_neoxmii import backends
from tests.unit.engines_for_workers import EchoEngine

backends.register("echo", EchoEngine)
"""

PRELAUNCH_TESTS = """
def test_launched_before_any_test_asked(neox):
    assert neox.prelaunched == ["echo"] and list(neox.pending) == [f"echo:{neox.dtype}"]
    pending = neox.pending[f"echo:{neox.dtype}"]
    assert pending._trees and not pending._ready          # its process runs; nothing has waited for it

def test_backend_waits_for_the_launched_worker(neox):
    pending = neox.pending[f"echo:{neox.dtype}"]
    neox.settle()                                          # what a latency test does before timing
    assert pending._ready and not neox.pending
    backend = neox.backend("echo")
    assert backend is pending
    case = neox.case(next(p for p in neox.plans() if p.generate))
    assert neox.generation(backend, case).tokens
"""


@pytest.fixture
def engines_restored():
    """The in-process runs' conftest registers `echo` in the plugin's registry: taken out again afterwards,
    so that later tests see the built-in engines only."""
    from pytest_neoxmii.backends import ENGINES
    saved = dict(ENGINES)
    yield
    ENGINES.clear()
    ENGINES.update(saved)


def test_prelaunch_starts_every_selected_worker_at_session_start(pytester, preloaded, synthetic_14m,
                                                                 engines_restored):
    """The session launches the isolated engines' workers when it starts, and the first test needing one
    waits for that worker instead of deploying another; the summary says so."""
    pytester.makeconftest(PRELAUNCH_CONFTEST)
    pytester.makepyfile(test_prelaunch=PRELAUNCH_TESTS)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["workers launched when the session started, loading side by side: echo *"])
    assert not processes.live()


ASKED_TESTS = """
import pytest

def test_named(neox, neox_backend_name):
    assert neox.prelaunched == ["echo"]

def test_unnamed(neox):
    assert neox.prelaunched == ["echo"]        # it may call neox.backend() with any name

def test_reference_fixture(neox, neox_reference):
    assert neox.prelaunched == []

@pytest.mark.parametrize("tp_name", ["echo"])
def test_tensor_parallel(neox, tp_name):
    assert neox.options.tp == 1 and neox.prelaunched == []     # below --neox-tp=2 such a test skips

@pytest.mark.neox_engines()
def test_marked_reference_alone(neox):
    assert neox.prelaunched == []

@pytest.mark.neox_engines("hf")
def test_marked_reference_by_name(neox):
    assert neox.prelaunched == []

@pytest.mark.neox_engines("echo")
def test_marked_engine(neox):
    assert neox.prelaunched == ["echo"]

@pytest.mark.neox_engines()
@pytest.mark.parametrize("name", ["echo"])
def test_marker_over_parameter(neox, name):
    assert neox.prelaunched == []               # the marker is what the test says it deploys
"""


@pytest.mark.parametrize("selection", ["test_named", "test_unnamed", "test_reference_fixture",
                                       "test_tensor_parallel", "test_marked_reference_alone",
                                       "test_marked_reference_by_name", "test_marked_engine",
                                       "test_marker_over_parameter"])
def test_prelaunch_starts_only_the_workers_the_selected_tests_name(pytester, preloaded, synthetic_14m,
                                                                     engines_restored, selection):
    """A test names its engine by a parameter or a deployment fixture, or says it with neox_engines; one
    that uses the session and names no engine may ask for any, so every selected worker starts; one of the
    reference alone starts none."""
    pytester.makeconftest(PRELAUNCH_CONFTEST)
    pytester.makepyfile(test_asked=ASKED_TESTS)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32", "-k", selection)
    result.assert_outcomes(passed=1)
    assert not processes.live()


@pytest.mark.parametrize("marker, said", [
    ('neox_engines("dss")', "got 'dss'"),
    ("neox_engines(3)", "got 3"),
    ('neox_engines(engine="ds")', "got engine=..."),
])
def test_a_neox_engines_marker_naming_no_engine_is_a_usage_error(pytester, preloaded, synthetic_14m,
                                                                 engines_restored, marker, said):
    """A typo in the marker would leave the engine it meant unstarted until a test asks for it: the run
    stops before any test with one line naming the test, what it got and the engines there are."""
    # (after a test naming no engine, which lets every engine start: the marker is checked all the same)
    error = _the_one_usage_error(pytester, synthetic_14m, "def test_any(neox):\n    pass\n\n"
                                 f"@pytest.mark.{marker}\ndef test_it(neox):\n    pass\n")
    assert error.startswith("ERROR: test_marked.py::test_it: neox_engines(*names) takes engine names (")
    assert "echo" in error and error.endswith(said), error


def _the_one_usage_error(pytester, synthetic_14m, tests: str) -> str:
    """Run `tests` (test_marked.py) with the echo engine: the run must stop as a usage error, with one ERROR
    line and no traceback, and leave no process behind. Returns that line."""
    pytester.makeconftest(PRELAUNCH_CONFTEST)
    pytester.makepyfile(test_marked="import pytest\n\n" + tests)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    errors = [ln for ln in result.errlines if ln.startswith("ERROR:")]
    assert len(errors) == 1, result.errlines
    assert "Traceback" not in result.stdout.str() + "\n".join(result.errlines)
    assert not processes.live()
    return errors[0]


@pytest.mark.parametrize("marker, said", [
    ('neox_scores("fixed_text")', "got 'fixed_text'"),
    ("neox_scores()", "got nothing"),
    ('neox_scores(family="long")', "got family=..."),
])
def test_a_neox_scores_marker_naming_no_case_family_is_a_usage_error(pytester, preloaded, synthetic_14m,
                                                                     engines_restored, marker, said):
    """The marker says which cases' scores to compute ahead; a family that does not exist would compute
    nothing ahead, unsaid: the run stops before any test with one line naming the test and the families."""
    error = _the_one_usage_error(pytester, synthetic_14m, f"@pytest.mark.{marker}\ndef test_it(neox):\n    pass\n")
    assert error.startswith("ERROR: test_marked.py::test_it: neox_scores(*families) takes case families "
                            "(fixed-text, short, "), error
    assert error.endswith(said), error


@pytest.mark.parametrize("marker, said", [('neox_rows_alone("padded")', "got 'padded'"),
                                          ("neox_rows_alone(rows=2)", "got rows=...")])
def test_a_neox_rows_alone_marker_with_arguments_is_a_usage_error(pytester, preloaded, synthetic_14m,
                                                                  engines_restored, marker, said):
    error = _the_one_usage_error(pytester, synthetic_14m, f"@pytest.mark.{marker}\ndef test_it(neox):\n    pass\n")
    assert error.startswith("ERROR: test_marked.py::test_it: neox_rows_alone takes no arguments"), error
    assert error.endswith(said), error


def test_the_suites_reference_tests_and_tensor_parallel_tests_below_tp_2_start_no_worker(
        pytester, preloaded, synthetic_14m, engines_restored, tmp_path):
    """`-k reference` on the shipped suite: no engine worker starts beside the reference (on the 2-core CPU
    three workers loading beside it had made such a run take 104 s instead of 58); nor for a tensor-parallel
    test that skips (here its multi_gpu marker; at --neox-tp=1 on two GPUs, its tp_name: test_tensor_parallel)."""
    pytester.makeconftest(PRELAUNCH_CONFTEST)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(
        *args, "--neox-backends=echo", "--neox-dtype=fp32", "--pyargs", "pytest_neoxmii.suite", "-k",
        "test_reference_outputs_are_finite and short-b1-len4 or test_tp_greedy_parity",
        "--neox-report", str(tmp_path / "report"))
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1 and outcomes.get("failed", 0) == 0, result.stdout.str()[-3000:]
    summary = json.loads((tmp_path / "report" / "neoxmii-summary.json").read_text())
    assert summary["prelaunched"] == [], summary["prelaunched"]
    assert "workers launched" not in result.stdout.str()
    assert not processes.live()


def test_no_prelaunch_where_the_engines_would_not_fit_beside_the_reference(pytester, preloaded, synthetic_14m,
                                                                          monkeypatch, engines_restored):
    from pytest_neoxmii import hardware, session as session_module
    from pytest_neoxmii.hardware import Gpu, Hardware
    tiny = Hardware(gpus=(Gpu(0, "a tiny GPU", 60 * 2**20, (9, 0)),), cuda_version="12.8", driver_version="570.1")
    monkeypatch.setattr(hardware, "detect", lambda: tiny)     # 14m: fp32 + fp16 + fp16 x 1.2 > 60 MiB
    monkeypatch.setattr(session_module.NeoxSession, "device", property(lambda self: "cpu"))   # nothing runs on it
    pytester.makeconftest(PRELAUNCH_CONFTEST)
    pytester.makepyfile(test_no_prelaunch="""
def test_nothing_launched(neox):
    assert neox.prelaunched == [] and neox.pending == {}
""")
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("selected, launched", [("echo", ["echo"]), ("echo,stream", [])])
def test_an_engine_streaming_its_weights_counts_at_its_weights_beside_the_reference(
        pytester, preloaded, synthetic_14m, monkeypatch, engines_restored, selected, launched):
    """ZeRO keeps its weights off the GPU, but its worker's allocator keeps what it fetched (23.6 GiB after
    working ahead on pythia-12b, one H200): prelaunch counts it at its weights. 14m fp32 on a GPU with 160 MiB
    beside the test process's runtime: reference 53.7 + echo 53.7 MiB, x 1.2 = 128.8 MiB fits; with the
    streaming engine, 193.2 MiB does not."""
    from pytest_neoxmii import hardware, session as session_module
    from pytest_neoxmii.hardware import Gpu, Hardware
    from pytest_neoxmii.registry import TEST_PROCESS_RUNTIME_BYTES
    gpu = Hardware(gpus=(Gpu(0, "a small GPU", 160 * 2**20 + TEST_PROCESS_RUNTIME_BYTES, (9, 0)),),
                   cuda_version="12.8", driver_version="570.1")
    monkeypatch.setattr(hardware, "detect", lambda: gpu)
    monkeypatch.setattr(session_module.NeoxSession, "device", property(lambda self: "cpu"))   # nothing runs on it
    pytester.makeconftest(PRELAUNCH_CONFTEST + "from tests.unit.engines_for_workers import StreamsItsWeights\n"
                          "backends.register('stream', StreamsItsWeights)\n")
    pytester.makepyfile(test_prelaunched=f"""
def test_what_was_launched(neox):
    assert neox.prelaunched == {launched!r}
""")
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, f"--neox-backends={selected}", "--neox-dtype=fp32")
    result.assert_outcomes(passed=1)
    assert not processes.live()


AHEAD_TESTS = """
import pytest

def test_greedy(neox, neox_backend_name, neox_generation_case):
    assert neox.generation(neox.backend(neox_backend_name), neox_generation_case).tokens

def test_scored(neox, neox_backend_name, neox_case):
    assert neox.scores(neox.backend(neox_backend_name), neox_case).logprobs.numel()

@pytest.mark.neox_scores("fixed-text")          # scored without a case parameter, as golden perplexity is
def test_perplexity(neox, neox_backend_name):
    plan = next(p for p in neox.plans() if p.family == "fixed-text")
    assert neox.scores(neox.backend(neox_backend_name), neox.case(plan)).logprobs.numel()

@pytest.mark.neox_rows_alone
def test_rows_alone(neox, neox_generation_case):
    case, ref = neox_generation_case, neox.reference()
    if len(set(case.plan.lengths)) < 2:
        assert case.plan not in neox.rows_alone_plans
        return
    # computed while the worker loaded: every row of the padded case is already in the session's cache
    keys = [("generate", ref.info.backend, ref.info.dtype, f"{case.id}-row{i}") for i in range(len(case.batch.rows))]
    assert all(key in neox._cache for key in keys), keys
    rows = neox.rows_alone(ref, case)                 # the cached generations, not computed again
    assert all(row is neox._cache[key] and len(row.tokens) == 1 for row, key in zip(rows, keys))

def test_what_was_worked_ahead(neox, request):
    selected = request.config.getoption("-k")
    plans = neox.plans()
    padded = [p.id for p in plans if p.generate and len(set(p.lengths)) > 1]
    assert [p.id for p in neox.rows_alone_plans] == (padded if selected == "" else [])
    generated = [("generate", p.id) for p in plans if p.generate]
    scored = [("score", p.id) for p in plans
              if "greedy" not in selected or ("perplexity" in selected and p.family == "fixed-text")]
    assert [(op, plan.id) for op, plan in neox.wanted["echo"]] == generated + scored
    neox.settle()
    report = neox.ahead_reports[f"echo:{neox.dtype}"]
    assert report["calls"] == report["computed"] == len(generated + scored)
    assert report["unclaimed"] == 0          # every result computed ahead was handed to a test
    # the test process worked ahead too: the reference's side of every wanted case, while echo loaded
    assert neox.reference_ahead == len({plan.id for _op, plan in neox.wanted["echo"]})
"""


@pytest.mark.parametrize("selection", ["", "greedy or worked", "greedy or perplexity or worked"])
def test_the_selected_tests_outputs_are_computed_ahead_in_the_worker(pytester, preloaded, synthetic_14m,
                                                                     engines_restored, selection):
    """The session reads what the selected tests (after -k) will ask each engine for, the prelaunched
    worker computes exactly that after its load, and every result is handed over; the summary says so."""
    pytester.makeconftest(PRELAUNCH_CONFTEST)
    pytester.makepyfile(test_ahead=AHEAD_TESTS)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32", "-k", selection,
                                "--neox-work-ahead=always")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["worked ahead, side by side: echo *[0-9]/*[0-9] calls in * s*"])
    result.stdout.fnmatch_lines(["workers launched when the session started*; meanwhile the reference's "
                                 "outputs of [1-9]* cases were computed (* s, its load included)"])
    assert not processes.live()


def test_on_the_cpu_the_worker_and_the_test_process_work_ahead_on_their_share_of_the_cores(
        pytester, preloaded, synthetic_14m, engines_restored, on_the_cpu):
    """A CPU session works ahead by default too, each process on its share of the cores torch would take
    alone (here one worker and the test process: half), and the test process gets its own count back."""
    import torch
    pytester.makeconftest(PRELAUNCH_CONFTEST)
    pytester.makepyfile(test_cpu_ahead=f"""
import torch

def test_greedy(neox, neox_backend_name, neox_generation_case):
    assert neox.generation(neox.backend(neox_backend_name), neox_generation_case).tokens

def test_worked_ahead_on_a_share(neox):
    neox.settle()
    report = neox.ahead_reports["echo:" + neox.dtype]
    assert report["computed"] == report["calls"] > 0
    assert report["threads"] == max(1, {torch.get_num_threads()} // 2)
    assert neox.reference_ahead > 0
    assert torch.get_num_threads() == {torch.get_num_threads()}      # the test process's own count again
""")
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0 and outcomes["passed"] >= 2, \
        result.stdout.str()[-3000:]
    threads = max(1, torch.get_num_threads() // 2)
    result.stdout.fnmatch_lines([f"worked ahead, side by side: echo *[0-9]/*[0-9] calls in * s on {threads} "
                                 f"thread{'s' if threads != 1 else ''}"])


def test_work_ahead_runs_on_the_threads_it_was_given_and_gives_them_back():
    """worker.Served: the calls worked ahead run on the given thread count; the process's own is set again
    once they are done, before any request of the session's."""
    import torch
    from pytest_neoxmii.worker import Served

    class Counting:
        seen = []

        def generate(self, *args):
            self.seen.append(torch.get_num_threads())
            return args

    before = torch.get_num_threads()
    served = Served(Counting())
    served.start_ahead([("generate", (1,)), ("generate", (2,))], threads=1).join(timeout=30)
    assert Counting.seen == [1, 1]
    assert served.ahead_done()["threads"] == 1
    assert torch.get_num_threads() == before
    served.generate(3)                       # not worked ahead: computed on the process's own count
    assert Counting.seen[-1] == before


LAUNCH_FAILS_CONFTEST = """
from pytest_neoxmii import backends
from pytest_neoxmii.deploy import processes
from tests.unit.engines_for_workers import EchoEngine

backends.register("echo", EchoEngine)
STARTS = []

def no_process(*args, **kwargs):
    STARTS.append(args)
    raise processes.DeploymentError("no process can start here today")

processes.start = no_process
"""


def test_a_prelaunch_that_fails_to_start_is_a_failure_of_each_test_and_never_retried(pytester, preloaded,
                                                                                     synthetic_14m,
                                                                                     engines_restored,
                                                                                     monkeypatch):
    from pytest_neoxmii.deploy import processes as real_processes
    monkeypatch.setattr(real_processes, "start", real_processes.start)    # restored after the in-process run
    pytester.makeconftest(LAUNCH_FAILS_CONFTEST)
    pytester.makepyfile(test_launch_fails="""
import conftest

def test_first(neox):
    neox.backend("echo")

def test_second(neox):
    neox.backend("echo")

def test_started_once():
    assert len(conftest.STARTS) == 1
""")
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*echo (fp32) failed to deploy: no process can start here today*"])


BREAKS_CONFTEST = PRELAUNCH_CONFTEST + """
from pytest_neoxmii import known_issues

known_issues.KNOWN_ISSUES = known_issues.KNOWN_ISSUES + (known_issues.KnownIssue(
    key="echo-padded-breaks", check="greedy", backends=("echo",), needs_kernels=False, padded_only=True,
    condition="a stand-in defect", upstream="none", breaks_engine="later calls would read garbage"),)
"""

BREAKS_TESTS = """
def test_declares_the_greedy_outputs_wanted(neox_backend_name, neox_generation_plan):
    pass                 # its parameters tell the session what echo's worker computes ahead

def _plans(neox):
    padded = next(p for p in neox.plans() if p.generate and len(set(p.lengths)) > 1)
    others = [p for p in neox.plans() if p.generate and len(set(p.lengths)) == 1]
    return padded, others

def test_the_breaking_call_is_worked_ahead_last(neox):
    padded, others = _plans(neox)
    echo = neox.backend("echo")
    if neox.options.work_ahead == "always":
        assert [args[0] for op, args in echo.ahead if op == "generate"][-1] == neox.case(padded).batch
        assert f"echo:{neox.dtype}" in neox.extra.ahead_breaks and not neox.extra.broken

def test_after_it_only_what_was_computed_ahead_comes_from_the_broken_deployment(neox):
    padded, others = _plans(neox)
    echo = neox.backend("echo")
    neox.generation(echo, neox.case(padded))
    assert list(neox.extra.broken) == [f"echo:{neox.dtype}"] and not neox.redeployed
    neox.generation(echo, neox.case(others[0]))
    if neox.options.work_ahead == "always":      # computed before the defect ran: handed over, not redeployed
        assert neox.backend("echo") is echo and neox.extra.broken
    else:                                        # computed after it: on the engine deployed again
        assert neox.backend("echo") is not echo and echo.teardown_report is not None
        assert neox.redeployed == ["echo deployed again after known issue [echo-padded-breaks] ran: "
                                   "later calls would read garbage"]

def test_settle_deploys_it_again_before_the_tests_that_follow(neox):
    replacement = neox.extra.replacements.get(f"echo:{neox.dtype}")
    if neox.options.work_ahead == "always":      # the broken one still serves: its replacement loads meanwhile
        assert replacement is not None
    neox.settle()
    assert not neox.extra.broken and not neox.extra.replacements and len(neox.redeployed) == 1
    fresh = neox.backend("echo")
    assert fresh.teardown_report is None          # a live, fresh deployment
    assert replacement is None or fresh is replacement
"""


@pytest.mark.parametrize("ahead", ["always", "never"])
def test_a_known_defect_that_breaks_the_engine_runs_last_and_the_engine_deploys_again(
        pytester, preloaded, synthetic_14m, engines_restored, monkeypatch, ahead):
    """Measured on pythia-12b (one H200): after ds decoded the padded batch (known issue
    ds-left-padded-decode), CUDA reported an illegal memory access (in that call or the next). Such a
    call is worked ahead last, only results computed before it come from that deployment, and the engine
    deploys again for anything else (at the latest when the timing and teardown tests settle)."""
    from pytest_neoxmii import known_issues
    monkeypatch.setattr(known_issues, "KNOWN_ISSUES", known_issues.KNOWN_ISSUES)   # restored afterwards
    pytester.makeconftest(BREAKS_CONFTEST)
    pytester.makepyfile(test_breaks=BREAKS_TESTS)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32", f"--neox-work-ahead={ahead}")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0 and outcomes["passed"] > 3, \
        result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["echo deployed again after known issue [[]echo-padded-breaks[]] ran: *"])
    assert not processes.live()


UNCLAIMED_BREAK_TESTS = """
def test_declares_the_greedy_outputs_wanted(neox_backend_name, neox_generation_plan):
    pass

def test_a_breaking_call_worked_ahead_but_never_asked_for_still_retires_the_deployment(neox):
    echo = neox.backend("echo")
    if neox._waits_for_kernel_build("echo"):       # cold: its replacement has loaded since the session started
        assert neox.extra.replacements.get(f"echo:{neox.dtype}") is not None
    echo.wait_ahead()                              # the breaking call has run: the replacement loads from now on
    neox.extra.replace_once_broken()               # (as before every test)
    replacement = neox.extra.replacements.get(f"echo:{neox.dtype}")
    assert replacement is not None and echo.finished_ahead()
    neox.settle()                                  # no test asked for the padded batch's result
    assert echo.teardown_report is not None, "the deployment that ran the breaking call is still up"
    fresh = neox.backend("echo")
    assert fresh is not echo and fresh.teardown_report is None and len(neox.redeployed) == 1
    assert replacement is None or fresh is replacement
"""


@pytest.mark.parametrize("cold", [False, True], ids=["kernels-cached", "kernels-building"])
def test_a_deployment_that_ran_a_breaking_call_ahead_is_never_timed(pytester, preloaded, synthetic_14m,
                                                                     engines_restored, monkeypatch, cold):
    from pytest_neoxmii import known_issues
    from pytest_neoxmii.session import NeoxSession
    monkeypatch.setattr(known_issues, "KNOWN_ISSUES", known_issues.KNOWN_ISSUES)   # restored afterwards
    monkeypatch.setattr(NeoxSession, "_waits_for_kernel_build", lambda self, name: cold and name == "echo")
    pytester.makeconftest(BREAKS_CONFTEST)
    pytester.makepyfile(test_unclaimed=UNCLAIMED_BREAK_TESTS)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32", "--neox-work-ahead=always")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0 and outcomes["passed"] > 1, \
        result.stdout.str()[-3000:]
    assert not processes.live()


POISONED_CONFTEST = """
from pytest_neoxmii import backends, known_issues
from tests.unit.engines_for_workers import PoisonedByPadding

backends.register("poison", PoisonedByPadding)
known_issues.KNOWN_ISSUES = known_issues.KNOWN_ISSUES + (known_issues.KnownIssue(
    key="poison-padded-breaks", check="greedy", backends=("poison",), needs_kernels=False, padded_only=True,
    condition="a stand-in defect", upstream="none", breaks_engine="an illegal memory access"),)
"""

POISONED_TESTS = """
import pytest

def test_declares_the_greedy_outputs_wanted(neox_backend_name, neox_generation_plan):
    pass

def _plans(neox):
    padded = next(p for p in neox.plans() if p.generate and len(set(p.lengths)) > 1)
    return padded, [p for p in neox.plans() if p.generate and len(set(p.lengths)) == 1]

def test_the_breaking_call_fails_itself_and_crashes_nothing(neox):
    padded, others = _plans(neox)
    poison = neox.backend("poison")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)known issue \\[poison-padded-breaks\\] broke the "
                       r"deployment in this call.*illegal memory access was encountered \\(stand-in\\)"):
        neox.generation(poison, neox.case(padded))
    assert not neox.crashed and list(neox.extra.broken) == [f"poison:{neox.dtype}"]

def test_the_other_cases_still_get_answers(neox):
    padded, others = _plans(neox)
    for plan in others:      # worked ahead before the defect, or computed by the engine deployed again
        assert neox.generation(neox.backend("poison"), neox.case(plan)).tokens
    assert not neox.crashed

def test_settle_leaves_a_fresh_deployment(neox):
    neox.settle()
    assert not neox.extra.broken and not neox.crashed
    assert neox.redeployed == ["poison deployed again after known issue [poison-padded-breaks] ran: "
                               "an illegal memory access"]
    assert neox.backend("poison").teardown_report is None
"""


@pytest.mark.parametrize("ahead", ["always", "never"])
def test_a_known_defect_that_breaks_the_engine_in_its_own_call_is_not_a_crash_of_the_engine(
        pytester, preloaded, synthetic_14m, engines_restored, monkeypatch, ahead):
    """Measured on pythia-12b (one H200, synthetic weights): ds's padded-batch decode (known issue
    ds-left-padded-decode) raised the illegal memory access in its own call, or CUDA reported it there, and
    every later ds test failed as crashed. That call's test fails with it (its known issue expects a
    failure); the engine deploys again for the rest, which get answers."""
    from pytest_neoxmii import known_issues
    monkeypatch.setattr(known_issues, "KNOWN_ISSUES", known_issues.KNOWN_ISSUES)   # restored afterwards
    pytester.makeconftest(POISONED_CONFTEST)
    pytester.makepyfile(test_poisoned=POISONED_TESTS)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=poison", "--neox-dtype=fp32",
                                f"--neox-work-ahead={ahead}")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0 and outcomes["passed"] >= 4, \
        result.stdout.str()[-3000:]
    assert not processes.live()


STATEFUL_SMI = """#!/bin/sh
# GPU 0 as nvidia-smi would show it around a worker whose pid the test wrote to $PIDFILE: 1000 MiB before
# it starts; while it lives, 6123 MiB of which it holds 5000 (123 MiB appeared meanwhile, nobody's); once it
# is gone, 1123 MiB (or 6123 with LEAK=1: its memory never came back).
pid=$(cat "$PIDFILE" 2>/dev/null)
if [ -z "$pid" ]; then used=1000; app=""
elif kill -0 "$pid" 2>/dev/null; then used=6123; app="GPU-aaa, $pid, 5000"
elif [ -n "$LEAK" ]; then used=6123; app=""
else used=1123; app=""; fi
case "$1" in
  --query-gpu=*) echo "0, GPU-aaa, $used" ;;
  --query-compute-apps=*) [ -n "$app" ] && echo "$app" ;;
esac
exit 0
"""


@pytest.mark.parametrize("leak", [False, True])
def test_teardown_judges_gpu_memory_across_the_close(tmp_path, monkeypatch, leak):
    """Memory that appeared after the launch and belongs to no process (+123 MiB here, as once on one H200,
    pythia-410m synthetic) is not the deployment's leak: the check takes what the GPU held just before the
    close, less what nvidia-smi attributes to the deployment's processes. Memory the processes held and that
    does not come back is still a leak."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(STATEFUL_SMI)
    smi.chmod(0o755)
    pidfile = tmp_path / "worker.pid"
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PIDFILE", str(pidfile))
    monkeypatch.setenv("NEOXMII_MEMORY_TIMEOUT", "1")
    if leak:
        monkeypatch.setenv("LEAK", "1")
    engine = IsolatedEngine("echo", stand_ins.EchoEngine, request_for(tmp_path, "cuda:0"), memory_probe="default",
                            ready_timeout=120)
    pidfile.write_text(str(engine._trees[0].popen.pid))
    assert engine.generate(BATCH, 1).tokens == [[6], [9]]
    with warnings.catch_warnings(record=True):      # the leak variant warns
        engine.close()
    report = engine.teardown_report
    assert report.memory_baseline_is == "before the close, less what its processes held"
    assert report.memory_baseline_mib == {0: 1123.0}
    if leak:
        assert report.leaked and report.memory_not_returned_mib == {0: 5000.0}
        assert "GPU memory not returned: GPU 0 5000 MiB" in report.describe()
        processes._LEAKS.remove(report)
    else:
        assert not report.leaked, report.describe()
        assert "GPU 0 +0 MiB" in report.describe()


RACING_SMI = """#!/bin/sh
# GPU 0 around a worker ($PIDFILE) while the test process ($OURPID) loads beside it: the worker holds 5000 MiB,
# the test process 3000 until, once $RACE exists, the second memory.used reading has been taken: then 3154 (it
# allocated 154 MiB right after that reading, before the next process list). 1123 MiB belong to nobody.
pid=$(cat "$PIDFILE" 2>/dev/null)
ours=3000; [ -f "$RACE.grown" ] && ours=3154
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then worker=5000; app="GPU-aaa, $pid, 5000"; else worker=0; app=""; fi
case "$1" in
  --query-gpu=*) echo "0, GPU-aaa, $((1123 + worker + ours))"
    if [ -f "$RACE" ]; then echo x >> "$RACE"; [ "$(wc -l < "$RACE")" -ge 2 ] && touch "$RACE.grown"; fi ;;
  --query-compute-apps=*) [ -n "$app" ] && echo "$app"; echo "GPU-aaa, $OURPID, $ours" ;;
esac
exit 0
"""


def test_a_process_allocating_while_the_baseline_is_read_is_no_leak(tmp_path, monkeypatch):
    """The GPUs' memory and the processes' figures are two nvidia-smi calls: a process of the session that
    allocates between them (the replacement of a ds deployment loading beside its close, once on one H200)
    made the baseline 154 MiB too low, and the close then read "GPU memory not returned: 154 MiB" for its
    whole wait. The processes are read again after memory.used until both agree."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(RACING_SMI)
    smi.chmod(0o755)
    pidfile, race = tmp_path / "worker.pid", tmp_path / "race"
    for key, value in {"PATH": f"{smi.parent}{os.pathsep}{os.environ['PATH']}", "PIDFILE": str(pidfile),
                       "OURPID": str(os.getpid()), "RACE": str(race), "NEOXMII_MEMORY_TIMEOUT": "1"}.items():
        monkeypatch.setenv(key, value)
    engine = IsolatedEngine("echo", stand_ins.EchoEngine, request_for(tmp_path, "cuda:0"), memory_probe="default",
                            ready_timeout=120)
    pidfile.write_text(str(engine._trees[0].popen.pid))
    assert engine.generate(BATCH, 1).tokens == [[6], [9]]
    race.touch()                                     # the test process allocates during the next reading
    with warnings.catch_warnings(record=True):
        engine.close()
    report = engine.teardown_report
    assert (race.parent / "race.grown").exists()
    assert report.memory_baseline_is == "before the close, less what its processes held"
    assert report.memory_baseline_mib == {0: 1123.0}
    if report.leaked:                                # (kept out of the session's own leak list)
        processes._LEAKS.remove(report)
    assert not report.leaked, report.describe()


SHARED_GPU_SMI = """#!/bin/sh
# GPU 0 shared with another job's process (pid $STRANGER, 1000 MiB) around a worker ($PIDFILE, 5000 MiB): once
# the worker is gone the stranger has grown to 2335 MiB. 123 MiB belong to nobody.
pid=$(cat "$PIDFILE" 2>/dev/null)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then worker=5000; app="GPU-aaa, $pid, 5000"; other=1000
elif [ -n "$pid" ]; then worker=0; app=""; other=2335
else worker=0; app=""; other=1000; fi
case "$1" in
  --query-gpu=*) echo "0, GPU-aaa, $((123 + worker + other))" ;;
  --query-compute-apps=*) [ -n "$app" ] && echo "$app"; echo "GPU-aaa, $STRANGER, $other" ;;
esac
exit 0
"""


def _shared_gpu(tmp_path, monkeypatch) -> Path:
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(SHARED_GPU_SMI)
    smi.chmod(0o755)
    pidfile = tmp_path / "worker.pid"
    for key, value in {"PATH": f"{smi.parent}{os.pathsep}{os.environ['PATH']}", "PIDFILE": str(pidfile),
                       "STRANGER": "4194301", "NEOXMII_MEMORY_TIMEOUT": "1"}.items():
        monkeypatch.setenv(key, value)
    return pidfile


def test_another_jobs_process_allocating_during_the_close_is_no_leak(tmp_path, monkeypatch):
    """On a GPU shared with processes outside the session (another CI job, the unit suite's other xdist
    workers) their allocations during a close are not the deployment's: once on one H200 the unit suite read
    "GPU memory not returned: GPU 0 1335 MiB" from its neighbours. Every listed process outside the deployment
    is left out of the figure, before the close and after it."""
    pidfile = _shared_gpu(tmp_path, monkeypatch)
    engine = IsolatedEngine("echo", stand_ins.EchoEngine, request_for(tmp_path, "cuda:0"), memory_probe="default",
                            ready_timeout=120)
    pidfile.write_text(str(engine._trees[0].popen.pid))
    assert engine.generate(BATCH, 1).tokens == [[6], [9]]
    with warnings.catch_warnings(record=True):
        engine.close()
    report = engine.teardown_report
    if report.leaked:                                # (kept out of the session's own leak list)
        processes._LEAKS.remove(report)
    assert report.memory_baseline_is == "before the close, less what its processes held"
    assert report.memory_baseline_mib == {0: 123.0} and report.memory_after_mib == {0: 123.0}, report.describe()
    assert not report.leaked, report.describe()


def test_a_deployment_on_the_cpu_is_not_judged_by_the_gpus_memory(tmp_path, monkeypatch):
    """A deployment on the CPU holds no GPU memory; on a machine with a GPU, what other processes do to it
    during the close was read as the deployment's leak (the fallback to the launch-time figure: its processes
    are not among nvidia-smi's). No GPU memory is judged for it."""
    pidfile = _shared_gpu(tmp_path, monkeypatch)
    engine = IsolatedEngine("echo", stand_ins.EchoEngine, request_for(tmp_path), memory_probe="default",
                            ready_timeout=120)
    pidfile.write_text(str(engine._trees[0].popen.pid))
    with warnings.catch_warnings(record=True):
        engine.close()
    report = engine.teardown_report
    if report.leaked:
        processes._LEAKS.remove(report)
    assert not report.leaked, report.describe()
    assert report.memory_after_mib is None and "GPU memory" not in report.describe(), report.describe()


SHARED_TESTS = """
def test_greedy(neox, neox_backend_name, neox_generation_case):
    case = neox_generation_case
    generation = neox.generation(neox.backend(neox_backend_name), case)
    assert generation.tokens == [[row[-1]] * case.plan.max_new_tokens for row in case.batch.rows]

def test_zy_a_helper_closes_once_its_share_is_taken(neox):
    import time
    for helper in neox.extra.helpers.get(f"share:{neox.dtype}", []):
        root = helper._trees[0].popen          # before settle: closing on its own thread, not waiting for it
        deadline = time.monotonic() + 15
        while root.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert root.poll() is not None, "a helper whose whole share was taken is still up before settle"

def test_zz_shared(neox):
    key = f"share:{neox.dtype}"
    helpers = neox.extra.helpers.get(key, [])
    assert len(helpers) == HELPERS
    pids = [pid for helper in helpers for pid in helper._trees[0].pids()]
    neox.settle()
    assert neox.extra.helpers == {} and not [pid for pid in pids if processes.alive(pid)]
    reports = {k: r for k, r in neox.ahead_reports.items() if k.startswith("share")}
    assert set(reports) == {key, *[f"share helper 1:{neox.dtype}"] * HELPERS}
    # every call wanted was computed ahead by one of the workers, and every result was handed to a test
    assert sum(r["calls"] for r in reports.values()) == len(neox.wanted["share"]) == 5
    assert all(r["computed"] == r["calls"] > 0 and r["unclaimed"] == 0 for r in reports.values()), reports
"""


@pytest.mark.parametrize("host_memory, helpers", [(None, 1), (1, 0)], ids=["plenty", "tight"])
def test_a_slow_engines_calls_ahead_are_shared_among_two_workers_where_memory_allows(
        pytester, preloaded, synthetic_14m, engines_restored, monkeypatch, host_memory, helpers):
    """An engine that asks for two workers (ZeRO-Inference: its calls fetch every layer from CPU memory while
    the GPU idles) gets a second worker of the same deployment, which computes its share of the calls ahead;
    each result reaches the test that asks for it, and the helper is closed before anything is timed. Where
    the host's memory cannot hold a second copy of the weights, one worker does it all."""
    from pytest_neoxmii import hardware
    if host_memory is not None:
        monkeypatch.setattr(hardware, "host_memory_available", lambda: host_memory)
    pytester.makeconftest(PRELAUNCH_CONFTEST + "from tests.unit.engines_for_workers import SharesItsWork\n"
                          "backends.register('share', SharesItsWork)\n")
    pytester.makepyfile(test_shared=f"from pytest_neoxmii.deploy import processes\nHELPERS = {helpers}\n"
                        + SHARED_TESTS)
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=share", "--neox-dtype=fp32", "-k", "not long",
                                "--neox-work-ahead=always")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0 and outcomes["passed"] == 7, \
        result.stdout.str()[-3000:]
    # each figure may end "on N threads" (a CPU session's share of the cores)
    result.stdout.fnmatch_lines(["worked ahead, side by side: share [0-9]/[0-9] calls in * s*"
                                 + (", share helper 1 [0-9]/[0-9] calls in * s*" if helpers else "")])
    assert not processes.live()


def test_a_helper_closes_on_a_thread_once_its_whole_share_is_taken_and_settle_waits_for_that_close():
    """ExtraWorkers.took: a helper closes once the session has taken every call of its share, never before,
    on a thread while the session goes on; its account is taken first; settle (retire_helpers) waits for that
    close instead of closing it again, and closes the helpers whose share was not all taken, as before."""
    import types

    from pytest_neoxmii.extra_workers import ExtraWorkers
    release = threading.Event()
    events = []

    class Helper:
        def __init__(self, name, ahead):
            self.name, self.ahead = name, ahead

        def wait_ready(self):
            return self

        def wait_ahead(self):
            events.append(("account", self.name))
            return {"calls": len(self.ahead)}

        def close(self):
            events.append(("close", self.name, threading.current_thread() is threading.main_thread()))
            release.wait(10)
            if self.name == "b":
                raise RuntimeError("its processes did not end")

    closed_by_session = []
    session = types.SimpleNamespace(
        ahead_reports={}, crashed={}, unavailable={}, timings=[],
        timed=lambda phase: contextlib.nullcontext(session.timings.append(phase)),
        close_all=lambda deployments: closed_by_session.append(sorted(deployments)))
    extra = ExtraWorkers(session)
    a, b, c = Helper("a", [("generate", (1,)), ("score", (1,))]), Helper("b", [("score", (2,))]), \
        Helper("c", [("score", (3,)), ("score", (4,))])
    extra.helpers["zero:fp16"] = [a, b, c]
    own = object()                                     # the deployment itself: not a helper, nothing closes
    extra.took("zero:fp16", own, ("score", (9,)))
    extra.took("zero:fp16", a, ("generate", (1,)))
    extra.took("zero:fp16", a, ("generate", (1,)))     # taken twice still counts once
    extra.took("zero:fp16", c, ("score", (3,)))
    assert events == [] and extra.closing == {}        # a's and c's shares are not all taken yet
    extra.took("zero:fp16", a, ("score", (1,)))
    extra.took("zero:fp16", b, ("score", (2,)))
    deadline = time.monotonic() + 10
    while len(events) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(e for e in events if e[0] == "close") == [("close", "a", False), ("close", "b", False)]
    for name in "ab":                                  # the account first, then the close on its own thread
        assert events.index(("account", name)) < events.index(("close", name, False)), events
    assert set(extra.closing) == {"zero helper 1:fp16", "zero helper 2:fp16"}
    assert session.ahead_reports == {"zero helper 1:fp16": {"calls": 2}, "zero helper 2:fp16": {"calls": 1}}
    release.set()
    extra.retire_helpers()
    assert closed_by_session == [["zero helper 3:fp16"]]     # c, whose share was not all taken, as before
    assert sum(e[0] == "close" for e in events) == 2           # a and b were not closed again
    assert session.unavailable == {"zero helper 2:fp16": "close failed: its processes did not end"}
    assert extra.helpers == {} and extra.closing == {} and "model teardown" in session.timings


def test_zero_inference_shares_its_calls_except_on_nvme_and_on_the_cpu(tmp_path, monkeypatch):
    from pytest_neoxmii.backends.zero_inference import AHEAD_WORKERS_ENV, ZeroInferenceBackend
    request = LoadRequest(path=tmp_path, dtype="fp16", device="cuda:0")
    monkeypatch.delenv(AHEAD_WORKERS_ENV, raising=False)
    assert ZeroInferenceBackend.ahead_workers(request) == 3
    assert ZeroInferenceBackend.ahead_workers(dataclasses.replace(request, zero_nvme=tmp_path)) == 1
    assert ZeroInferenceBackend.ahead_workers(dataclasses.replace(request, device="cpu", dtype="fp32")) == 1
    monkeypatch.setenv(AHEAD_WORKERS_ENV, "5")
    assert ZeroInferenceBackend.ahead_workers(request) == 5
    monkeypatch.setenv(AHEAD_WORKERS_ENV, "many")
    with pytest.warns(UserWarning, match="NEOXMII_ZERO_AHEAD_WORKERS='many' is not a non-negative number: using 3"):
        assert ZeroInferenceBackend.ahead_workers(request) == 3
    assert stand_ins.EchoEngine.ahead_workers(request_for(tmp_path)) == 1


def test_a_worker_waits_for_calls_given_after_its_launch(tmp_path):
    """The session launches the workers first and writes their calls ahead once the cases are built: the
    worker waits for the file (written whole, renamed into place), and works ahead nothing if it never comes."""
    import pickle
    from pytest_neoxmii.worker import read_ahead
    path = tmp_path / "ahead.pickle"
    calls = [("score", ("batch",))]

    def later():
        time.sleep(0.3)
        tmp = tmp_path / "ahead.pickle.tmp"
        tmp.write_bytes(pickle.dumps({"calls": calls, "threads": 2}))
        os.replace(tmp, path)
    writer = threading.Thread(target=later)
    writer.start()
    assert read_ahead(path, timeout=30) == {"calls": calls, "threads": 2}
    writer.join()
    assert read_ahead(tmp_path / "never.pickle", timeout=0.2) == {"calls": [], "threads": None}


def test_a_replacement_launches_once_the_breaking_work_ahead_is_done_and_only_once():
    """ExtraWorkers.replace_once_broken: the deployment whose work ahead ends with a breaking call gets its
    replacement when its worker says the work is done (its marker file), not before, and one only."""
    import types

    from pytest_neoxmii.extra_workers import ExtraWorkers
    done = {"flag": False}
    deployment = types.SimpleNamespace(finished_ahead=lambda: done["flag"])
    launched = []
    session = types.SimpleNamespace(pending={"ds:fp16": deployment}, backends={}, fit_at_once=lambda n, d: True,
                                    load=lambda name, dtype, wait: launched.append((name, dtype)) or object())
    extra = ExtraWorkers(session)
    extra.will_break_ahead("ds:fp16", issue=object(), replace_now=False)
    extra.replace_once_broken()
    assert launched == []                         # still working ahead: nothing launched
    done["flag"] = True
    extra.replace_once_broken()
    extra.replace_once_broken()
    assert launched == [("ds", "fp16")] and "ds:fp16" in extra.replacements


def test_a_worker_marks_its_work_ahead_done_after_the_last_call(tmp_path):
    from pytest_neoxmii.worker import Served
    marker = tmp_path / "ahead.done"

    class Engine:
        def generate(self, n):
            assert not marker.exists(), "marked done before its calls ran"
            return n
    served = Served(Engine())
    served.start_ahead([("generate", (1,)), ("generate", (2,))], done_marker=marker).join(10)
    assert marker.exists() and served.ahead_done()["computed"] == 2


def test_the_reference_worked_ahead_is_what_the_checks_compare_and_not_the_peers_generations():
    """While the workers load, the test process computes the fp32 reference's generations and scores and the
    peer's scores (the noise floor); the peer's generations are compared by no check, and are left out."""
    import types

    from pytest_neoxmii.session import NeoxSession
    calls = []
    plans = [types.SimpleNamespace(id="short", generate=True), types.SimpleNamespace(id="text", generate=False)]
    padded = types.SimpleNamespace(id="padded", generate=True)
    fake = types.SimpleNamespace(
        plans=lambda: plans, case=lambda plan: plan, reference=lambda: "fp32", peer=lambda: "fp16", _cache={},
        generation=lambda backend, case: calls.append(("generate", backend, case.id)),
        scores=lambda backend, case: calls.append(("score", backend, case.id)),
        rows_alone=lambda backend, case: calls.append(("rows alone", backend, case.id)), rows_alone_plans=[padded],
        extra=types.SimpleNamespace(replace_once_broken=lambda: None))
    NeoxSession.precompute_reference(fake, peer_generations=False)
    # the fp32 reference's every case, then the rows a selected test generates alone (neox_rows_alone), on
    # it only; then the peer's (one model after the other: where they do not fit together, each loads once)
    assert calls == [("generate", "fp32", "short"), ("score", "fp32", "short"), ("score", "fp32", "text"),
                     ("rows alone", "fp32", "padded"), ("score", "fp16", "short"), ("score", "fp16", "text")]
    calls.clear()                      # before a release (reference first): everything, so nothing reloads
    NeoxSession.precompute_reference(fake)
    assert ("generate", "fp16", "short") in calls and len(calls) == 7


def test_no_prelaunch_where_the_hosts_memory_would_not_hold_every_model(pytester, preloaded, synthetic_14m,
                                                                       monkeypatch, engines_restored, on_the_cpu):
    """A CPU session on a machine (or in a container) whose memory does not hold the reference and every
    engine at once deploys each engine when a test first needs it, and says why in one line. 14m fp32 in
    200 MiB: (56.3 + 56.3 MB) x 1.2 + three processes' runtime 1.1 GB > 0.21 GB."""
    from pytest_neoxmii import hardware
    monkeypatch.setattr(hardware, "host_memory_total", lambda: 200 * 2**20)
    pytester.makeconftest(PRELAUNCH_CONFTEST)
    pytester.makepyfile(test_no_prelaunch="""
def test_nothing_launched(neox):
    assert neox.prelaunched == [] and neox.pending == {}
    assert neox.backend("echo").info.backend == "echo"         # deployed when asked
""")
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32", "--neox-report",
                                str(pytester.path / "report"))
    result.assert_outcomes(passed=1)
    summary = json.loads((pytester.path / "report" / "neoxmii-summary.json").read_text())
    assert summary["engines_one_at_a_time"].startswith("engines deployed one at a time, when a test first needs")
    result.stdout.fnmatch_lines(["engines deployed one at a time, when a test first needs each: needed hf fp32 "
                                 "0.0563 GB + echo fp32 0.0563 GB, x 1.2 = 0.135 GB, + runtime of 3 processes "
                                 "1.1 GB = 1.2 GB > 0.21 GB of host memory"])
    assert not processes.live()


def test_the_reference_is_not_loaded_again_beside_engines_it_was_released_for(pytester, preloaded, synthetic_14m,
                                                                              monkeypatch, engines_restored,
                                                                              on_the_cpu):
    """Released so that an engine fits the host beside the HF models, the fp32 reference is not loaded again
    for the determinism test's uncached generation (in a 6 GiB container with pythia-1b, that reload had the
    kernel's OOM killer take a worker): the test skips, saying why. 14m fp32 in 500 MiB: the reference alone
    fits (0.43 GB), beside the echo engine it does not (0.86 GB)."""
    from pytest_neoxmii import hardware
    monkeypatch.setattr(hardware, "host_memory_total", lambda: 500 * 2**20)
    pytester.makeconftest(PRELAUNCH_CONFTEST)
    pytester.makepyfile(test_engine_then_reference="""
from pytest_neoxmii.suite import test_reference

def test_an_engine_deploys(neox):
    assert neox.backend("echo").info.backend == "echo"

test_reference_is_deterministic = test_reference.test_reference_is_deterministic     # (collected second)
""")
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32", "-rs", "-k",
                                "test_an_engine_deploys or short-b1-len4")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * the HF reference was released so that the engines fit beside it "
                                 "(reference first: 1 cases precomputed, hf fp32 released before echo (needed *"
                                 " of host memory)): loading it again for an uncached generation would not fit "
                                 "either"])
    assert not processes.live()


def test_a_worker_that_ended_on_its_own_after_its_tests_is_said_in_the_summary(pytester, preloaded, synthetic_14m,
                                                                                engines_restored, tmp_path):
    """A worker the kernel's OOM killer takes after its last test (seen: pythia-1b in a 6 GiB container, the zero
    worker) leaves no failed test behind: the summary and the JSON summary say how it ended, and its log is kept."""
    pytester.makeconftest(PRELAUNCH_CONFTEST)
    pytester.makepyfile(test_ends="""
import os, signal, time

def test_the_worker_is_killed_after_its_answer(neox):
    echo = neox.backend("echo")
    assert echo.generate(neox.case(neox.plans()[1]).batch, 1).tokens
    root = echo._trees[0].popen
    os.kill(root.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while root.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert root.poll() == -signal.SIGKILL
""")
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest(*args, "--neox-backends=echo", "--neox-dtype=fp32", "--neox-report",
                                str(tmp_path / "report"))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["echo tp=1 (worker process) ended on its own before the teardown (killed by "
                                 "SIGKILL); its log: */worker.log"])
    [line] = json.loads((tmp_path / "report" / "neoxmii-summary.json").read_text())["ended_before_teardown"]
    assert Path(line.rsplit("its log: ", 1)[1]).is_file()       # kept after the teardown
    assert not processes.live()


def test_a_bad_neox_engines_marker_is_one_usage_error_on_a_gpu_too(pytester, preloaded, synthetic_14m,
                                                                    engines_restored, fake_gpus):
    """On a GPU the markers are read at collection already, to know whether the engines will take turns
    (NeoxSession.engines_take_turns): the same one line, not an INTERNALERROR from the ordering hook."""
    fake_gpus("t4")
    error = _the_one_usage_error(pytester, synthetic_14m, '@pytest.mark.neox_engines(["ds"])\ndef test_it(neox):\n'
                                 "    pass\n")
    assert error.startswith("ERROR: test_marked.py::test_it: neox_engines(*names) takes engine names (")
    assert error.endswith("got ['ds']"), error

"""gpu_work.py (--neox-gpu-work): the GPU work of one call, judged against the baseline's, and where
latency.measure_backend and the latency check take it. The profiler itself needs a GPU: its figures are in
docs/SPEED.md (the twenty-third round)."""
from __future__ import annotations

import types

import pytest

from pytest_neoxmii import gpu_work, latency
from pytest_neoxmii.checks import latency as check
from pytest_neoxmii.gpu_work import GpuWork
from pytest_neoxmii.latency import LatencyResult, Timer
from pytest_neoxmii.outputs import PromptBatch

DS = GpuWork(operations=8333, busy_s=0.01902)      # one H200, pythia-160m synthetic, ds bs1 (the probe)
HF = GpuWork(operations=11688, busy_s=0.02433)     # the same shape through hf: what ds is without injection


@pytest.mark.parametrize("current, verdict", [
    (GpuWork(8333, 0.01905), "unchanged"),              # +0.16 %: what one machine repeats
    (GpuWork(8340, 0.01990), "unchanged"),              # +4.6 % busy: under the threshold
    (GpuWork(8333, 0.02010), "regression"),             # +5.7 % busy, the same operations: slower kernels
    (GpuWork(8800, 0.01902), "regression"),             # +5.6 % operations, the same busy time
    (GpuWork(7000, 0.01700), "improvement"),
])
def test_either_figure_beyond_the_threshold_decides(current, verdict):
    comparison = gpu_work.compare(DS, current)
    assert comparison.verdict == verdict
    assert comparison.failed == (verdict == "regression")


def test_a_lost_injection_is_a_regression_named_in_one_line():
    message = gpu_work.compare(DS, HF).message()
    assert message == ("GPU work per call 8333 -> 11688 operations (+40.3%), 19.02 -> 24.33 ms busy (+27.9%), "
                       "threshold 5%: regression")


@pytest.mark.parametrize("metrics, expected", [
    ({"gpu_operations_per_call": 8333, "gpu_busy_s_per_call": 0.01902}, DS),
    ({}, None),                                                          # measured without --neox-gpu-work
    ({"gpu_operations_per_call": None, "gpu_busy_s_per_call": None}, None),
    ({"gpu_operations_per_call": True, "gpu_busy_s_per_call": 0.01}, None),   # a hand-edited baseline
    ({"gpu_operations_per_call": 0, "gpu_busy_s_per_call": 0.01}, None),
    ({"gpu_operations_per_call": 10, "gpu_busy_s_per_call": -1.0}, None),
    ({"gpu_operations_per_call": 10, "gpu_busy_s_per_call": "0.01"}, None),
])
def test_figures_are_read_back_only_when_usable(metrics, expected):
    assert gpu_work.from_metrics(metrics) == expected


def _result(work) -> LatencyResult:
    return LatencyResult(backend="ds", dtype="fp16", device="cuda:0", batch_size=1, prompt_len=64, new_tokens=32,
                         rounds=6, warmup=1, e2e=[0.1] * 6, prefill=[0.01] * 6, gpu_work=work)


def test_the_result_publishes_and_describes_its_gpu_work():
    result = _result(DS)
    metrics = result.metrics()
    assert (metrics["gpu_operations_per_call"], metrics["gpu_busy_s_per_call"]) == (8333, 0.01902)
    assert gpu_work.from_metrics(result.as_dict()) == DS       # what a recorded baseline's "extra" holds
    assert result.describe().endswith("per call 8333 GPU operations, 19.02 ms GPU busy")
    assert _result(None).metrics()["gpu_operations_per_call"] is None


def test_the_gate_judges_gpu_work_only_when_asked_and_both_sides_have_it(capsys):
    on, off = types.SimpleNamespace(gpu_work=True), types.SimpleNamespace(gpu_work=False)
    recorded = {"extra": {"gpu_operations_per_call": 8333, "gpu_busy_s_per_call": 0.01902}}
    assert check._gate_gpu_work(off, recorded, _result(HF)) is None
    assert check._gate_gpu_work(on, recorded, _result(None)) is None          # not measured (the note says why)
    assert check._gate_gpu_work(on, recorded, _result(HF)).failed
    assert not check._gate_gpu_work(on, recorded, _result(DS)).failed
    result = _result(DS)
    assert check._gate_gpu_work(on, {"extra": {}}, result) is None
    note = ("GPU work not gated: the baseline has none (record it with --neox-update-baselines --neox-gpu-work)")
    assert result.notes == [note] and note in capsys.readouterr().out


class _LocalGpuStandIn:
    """An engine held in this process on "cuda:0": one call costs 0.1 s on the fake clock."""
    runs_in_worker = False

    def __init__(self, clock):
        self.clock = clock
        self.info = types.SimpleNamespace(backend="hf", dtype="fp16", device="cuda:0", tensor_parallel=1)
        self.model = self

    def generate(self, **kwargs):
        self.clock.now += 0.1


class _Clock:
    now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def local_gpu(monkeypatch):
    """measure_backend on a stand-in "GPU" engine: the CUDA memory readings and the model calls faked."""
    import torch
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)
    monkeypatch.setattr(latency, "model_calls", lambda backend, batch, n: (
        lambda: backend.generate(), lambda: backend.generate(), []))
    clock = _Clock()
    return clock, _LocalGpuStandIn(clock)


def test_gpu_work_is_one_more_call_after_the_timed_rounds(local_gpu, monkeypatch):
    clock, engine = local_gpu
    profiled = []

    def measure(call, device):
        profiled.append((clock.now, device))
        call()
        return DS
    monkeypatch.setattr(gpu_work, "measure", measure)
    batch = PromptBatch(rows=((1, 2),))
    result = latency.measure_backend(engine, batch, 4, 6, 1, timer=Timer(clock=clock), gpu_work=True)
    assert result.gpu_work == DS and len(result.e2e) == 6
    assert profiled == [(pytest.approx(1.4), "cuda:0")]       # after 7 rounds of 0.2 s: none of them profiled
    assert latency.measure_backend(engine, batch, 4, 6, 1, timer=Timer(clock=clock)).gpu_work is None


def test_gpu_work_the_profiler_cannot_see_is_a_note(local_gpu, monkeypatch):
    clock, engine = local_gpu

    def measure(call, device):
        raise gpu_work.GpuWorkUnavailable("the profiler recorded no GPU operation for the call (CUPTI "
                                          "unavailable?)")
    monkeypatch.setattr(gpu_work, "measure", measure)
    result = latency.measure_backend(engine, PromptBatch(rows=((1, 2),)), 4, 6, 1, timer=Timer(clock=clock),
                                     gpu_work=True)
    assert result.gpu_work is None
    assert result.notes == ["GPU work not measured: the profiler recorded no GPU operation for the call "
                            "(CUPTI unavailable?)"]


def test_an_engine_in_processes_of_its_own_says_its_gpu_work_is_out_of_reach(local_gpu, monkeypatch):
    clock, engine = local_gpu
    engine.runs_in_worker = True          # a server or launched ranks: generate over its channel
    engine.generate = lambda batch, n: setattr(clock, "now", clock.now + 0.1)
    monkeypatch.undo()                    # the real model_calls: the worker path
    monkeypatch.setattr(gpu_work, "measure", lambda call, device: pytest.fail("nothing to profile here"))
    result = latency.measure_backend(engine, PromptBatch(rows=((1, 2),)), 4, 6, 1, timer=Timer(clock=clock),
                                     gpu_work=True)
    assert result.gpu_work is None
    assert "GPU work not measured: the engine runs in processes of its own (its ranks or a server)" in result.notes


def test_a_cpu_session_measures_no_gpu_work(monkeypatch):
    monkeypatch.setattr(gpu_work, "measure", lambda call, device: pytest.fail("no GPU to profile"))
    clock = _Clock()

    class Cpu:
        runs_in_worker = True
        info = types.SimpleNamespace(backend="ds", dtype="fp32", device="cpu", tensor_parallel=1)

        def generate(self, batch, n):
            clock.now += 0.1
    result = latency.measure_backend(Cpu(), PromptBatch(rows=((1, 2),)), 4, 6, 1, timer=Timer(clock=clock),
                                     gpu_work=True)
    assert result.gpu_work is None and result.notes == [
        "timed through the worker channel (generate, with the per-step top-k the ranks return)",
        "GPU work not measured: the engine runs on the CPU"]


def test_an_isolated_engine_is_asked_to_measure_its_gpu_work_in_its_worker():
    asked = {}

    class Isolated:
        def measure_latency(self, batch, new_tokens, rounds, warmup, **kwargs):
            asked.update(kwargs)
            return _result(DS)
    result = latency.measure_backend(Isolated(), PromptBatch(rows=((1, 2),)), 32, 6, 1, gpu_work=True)
    assert asked["gpu_work"] is True and result.gpu_work == DS


def test_the_latency_tables_show_gpu_work_only_where_it_was_measured():
    from pytest_neoxmii.markdown_summary import render
    from pytest_neoxmii.report import latency_table
    measured, plain = [_result(DS).as_dict()], [_result(None).as_dict()]
    header, row = latency_table(measured).splitlines()[0:3:2]
    assert header.split()[-6:] == ["GPU", "ops", "GPU", "busy", "ms", "gate"]
    assert row.split()[-3:] == ["8333", "19.02", "-"]
    assert "GPU" not in latency_table(plain)
    session = {"model": {"name": "pythia-160m", "source": "synthetic", "seed": 0}, "dtype": "fp16"}
    text = render({**session, "latency": measured})
    assert "| GPU ops | GPU busy ms | gate |" in text and "| 8333 | 19.02 | - |" in text
    assert "GPU ops, GPU busy ms: the GPU work of one call (--neox-gpu-work)" in text
    assert "GPU ops" not in render({**session, "latency": plain})


def test_measure_counts_the_gpu_events_and_keeps_torchs_profiler_warning_to_itself(monkeypatch, recwarn):
    """gpu_work.measure on a stand-in profiler (this machine may have no GPU): GPU-side events counted and
    summed, CPU-side ones left out, and the UserWarning torch 2.11 gave once per process not passed on."""
    import warnings

    import torch
    import torch.profiler

    class Event:
        def __init__(self, device, ns):
            self.device, self.ns = device, ns

        def device_type(self):
            return self.device

        def duration_ns(self):
            return self.ns

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [Event(cuda, 2_000), Event(cpu, 9_000_000), Event(cuda, 3_000), Event(cuda, 5_000)]

    class Profile:
        def __init__(self, activities):
            assert activities == [torch.profiler.ProfilerActivity.CUDA]
            self.profiler = types.SimpleNamespace(kineto_results=types.SimpleNamespace(events=lambda: events))

        def __enter__(self):
            warnings.warn("Warning: Profiler clears events at the end of each cycle.Only events from the current "
                          "cycle will be reported.", UserWarning)
            return self

        def __exit__(self, *exc):
            return False
    calls = []
    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert gpu_work.measure(lambda: calls.append(1), "cuda:0") == GpuWork(operations=3, busy_s=10e-6)
    assert calls == [1] and not recwarn.list
    events[:] = [Event(cpu, 1_000)]
    with pytest.raises(gpu_work.GpuWorkUnavailable, match="recorded no GPU operation"):
        gpu_work.measure(lambda: None, "cuda:0")


def test_a_gpu_work_change_is_named_in_the_tables_and_the_changes_whatever_the_wall_clock_said():
    from pytest_neoxmii.markdown_summary import render
    from pytest_neoxmii.report_tables import latency_cells, latency_change
    assert latency_change({"gate_verdict": "unchanged", "gpu_work_verdict": "regression"}) == "GPU work regression"
    assert latency_change({"gate_verdict": "regression", "gpu_work_verdict": "improvement"}) == \
        "latency regression, GPU work improvement"
    assert latency_change({"gate_verdict": "unchanged", "gpu_work_verdict": "unchanged"}) is None
    assert latency_change({"gate_verdict": "no-baseline"}) is None
    result = _result(HF)
    result.gate = {"verdict": "unchanged", "gpu_work_verdict": "regression"}
    assert result.metrics()["gpu_work_verdict"] == "regression"
    assert latency_cells([result.as_dict()])[0][-1] == "unchanged, GPU work regression"
    session = {"model": {"name": "pythia-160m", "source": "synthetic", "seed": 0}, "dtype": "fp16",
               "latency_changes": [{"backend": "ds", "bench": "generate-bs1-p64-n32", "verdict": "unchanged",
                                    "gpu_work_verdict": "regression", "change": "GPU work regression",
                                    "summary": "ds generate-bs1-p64-n32: ..."},
                                   {"backend": "hf", "bench": "generate-bs1-p64-n32", "verdict": "regression",
                                    "summary": "hf (a summary written before --neox-gpu-work)"}]}
    text = render(session)
    assert "- GPU work regression: ds generate-bs1-p64-n32: ..." in text
    assert "- latency regression: hf (a summary written before --neox-gpu-work)" in text

"""Latency maths with fake timers: the TTFT/TPOT split, percentiles, tokens/s, the weight-streaming floor and
its percentage, the bandwidth table, the round bookkeeping under pytest-benchmark's pedantic mode, what is
called on a backend, and the per-test threshold marker. (The regression gate itself: test_stats.py.)"""
from __future__ import annotations

import dataclasses
import statistics
import types
from unittest import mock

import pytest

from pytest_neoxmii import latency
from pytest_neoxmii.checks.latency import threshold_for
from pytest_neoxmii.latency import (LatencyResult, Timer, bench_name, decode_samples, floor_pct, memory_bandwidth,
                                    run_rounds, weight_streaming_floor)
from pytest_neoxmii.outputs import PromptBatch
from pytest_neoxmii.registry import lookup


class FakeClock:
    """A clock that advances only when told to: each fake model call adds its duration."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def call(self, seconds):
        def fn():
            self.now += seconds
        return fn


# --- bandwidth and the floor ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", 3.35e12),
    ("NVIDIA H100 SXM5 80GB", 3.35e12),
    ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H200", 4.8e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12),
    ("NVIDIA A100-PCIE-40GB", 1.555e12),
    ("NVIDIA A100-SXM4-80GB", 2.0e12),
    ("NVIDIA A100 80GB PCIe", 2.0e12),
    ("Tesla T4", None),
    ("NVIDIA H100 NVL", None),
    ("", None),
    (None, None),
])
def test_bandwidth_table(name, expected):
    assert memory_bandwidth(name) == expected


def test_floor_matches_the_measured_facts():
    """docs/STACK.md: weights / ~3.35 TB/s is ~0.1 ms per decode step for pythia-160m and ~0.6 ms for pythia-1b."""
    h100 = memory_bandwidth("NVIDIA H100 80GB HBM3")
    f160 = weight_streaming_floor(lookup("pythia-160m").weight_bytes("fp16"), h100)
    f1b = weight_streaming_floor(lookup("pythia-1b").weight_bytes("fp16"), h100)
    assert f160 == pytest.approx(lookup("pythia-160m").parameter_count() * 2 / 3.35e12)
    assert 0.08e-3 < f160 < 0.12e-3
    assert 0.55e-3 < f1b < 0.7e-3
    assert weight_streaming_floor(10**9, 1e12, tp=2) == pytest.approx(0.5e-3)   # each GPU reads half
    assert weight_streaming_floor(10**9, None) is None


def test_floor_percentage():
    assert floor_pct(1e-3, 4e-3) == pytest.approx(25.0)
    assert floor_pct(1e-3, 1e-3) == pytest.approx(100.0)
    assert floor_pct(None, 4e-3) is None
    assert floor_pct(1e-3, None) is None
    assert floor_pct(1e-3, 0.0) is None
    assert floor_pct(1e-3, -1e-4) is None      # a noisy negative TPOT is not a percentage


# --- the TTFT / TPOT split --------------------------------------------------------------------------------

def test_decode_samples_pair_rounds():
    prefill = [0.020, 0.022, 0.021]
    e2e = [0.020 + 31 * 0.005, 0.022 + 31 * 0.006, 0.021 + 31 * 0.004]
    assert decode_samples(prefill, e2e, 32) == pytest.approx([0.005, 0.006, 0.004])
    assert decode_samples(prefill, e2e, 1) == []
    with pytest.raises(ValueError, match="rounds must pair"):
        decode_samples(prefill, e2e[:2], 32)


def _result(prefill, e2e, **kw) -> LatencyResult:
    base = dict(backend="ds", dtype="fp16", device="cuda:0", batch_size=4, prompt_len=64, new_tokens=32,
                rounds=len(e2e), warmup=3, e2e=e2e, prefill=prefill)
    base.update(kw)
    return LatencyResult(**base)


def test_result_metrics_from_known_samples():
    # 5 rounds: TTFT 20..24 ms, per-token decode 5..9 ms over 31 steps.
    prefill = [0.020, 0.021, 0.022, 0.023, 0.024]
    tpot = [0.005, 0.006, 0.007, 0.008, 0.009]
    e2e = [p + 31 * t for p, t in zip(prefill, tpot)]
    spec = lookup("pythia-160m")
    r = _result(prefill, e2e, weight_bytes=spec.weight_bytes("fp16"), gpu_name="NVIDIA H100 80GB HBM3",
                bandwidth=memory_bandwidth("NVIDIA H100 80GB HBM3"), peak_gpu_memory_bytes=123, ratio_to_hf=0.69)
    assert r.bench == "generate-bs4-p64-n32" == bench_name(4, 64, 32)
    assert r.ttft_s == pytest.approx(0.022)
    assert r.tpot_s == pytest.approx(0.007)
    assert r.e2e_s == pytest.approx(0.022 + 31 * 0.007)
    assert r.tokens_per_s == pytest.approx(4 * 32 / r.e2e_s)
    floor = spec.weight_bytes("fp16") / 3.35e12
    assert r.floor_s == pytest.approx(floor)
    assert r.floor_pct == pytest.approx(100 * floor / 0.007)
    m = r.metrics()
    # percentiles: numpy's linear interpolation over the 5 sorted samples
    assert m["e2e_p90_s"] == pytest.approx(e2e[3] + 0.6 * (e2e[4] - e2e[3]))
    assert m["e2e_p99_s"] == pytest.approx(e2e[3] + 0.96 * (e2e[4] - e2e[3]))
    assert m["ttft_p50_s"] == pytest.approx(0.022) and m["tpot_p90_s"] == pytest.approx(0.0086)
    assert m["peak_gpu_memory_bytes"] == 123 and m["ratio_to_hf"] == 0.69
    assert m["gpu"] == "NVIDIA H100 80GB HBM3"
    assert "ds/hf 0.69" in r.describe() and "% of TPOT" in r.describe()
    d = r.as_dict()
    assert d["e2e_samples_s"] == e2e and d["tpot_samples_s"] == pytest.approx(tpot)


def test_cpu_and_zero_floors_are_reported_not_guessed():
    cpu = _result([0.01] * 5, [0.05] * 5, device="cpu", weight_bytes=10**8)
    assert cpu.floor_s is None and cpu.floor_pct is None
    assert cpu.metrics()["floor"].startswith("unknown") and cpu.metrics()["gpu"] == "cpu"
    zero = _result([0.01] * 5, [0.05] * 5, backend="zero", weight_bytes=10**8, bandwidth=3.35e12)
    assert zero.floor_s is None and "PCIe" in zero.floor_note


# --- timing and rounds --------------------------------------------------------------------------------------

def test_timer_measures_between_syncs():
    clock = FakeClock()
    synced = []
    timer = Timer("cpu", clock=clock, sync=lambda: synced.append(clock()))
    assert timer.measure(clock.call(0.25)) == pytest.approx(0.25)
    assert synced == [100.0, 100.25]       # synchronized before starting and after the call
    assert not Timer("cuda:0", clock=clock).cuda   # a given clock is used even for a CUDA device


def test_rounds_without_benchmark_drop_warmups():
    clock = FakeClock()
    calls = []

    def prefill():
        calls.append("p")
        clock.now += next(pre)

    def full():
        calls.append("f")
        clock.now += next(full_d)

    pre = iter([0.5, 0.01, 0.02, 0.03])            # warm-up round is slow (compilation, caches)
    full_d = iter([5.0, 0.11, 0.12, 0.13])
    timed = run_rounds(prefill, full, Timer(clock=clock), rounds=3, warmup=1)
    assert calls == ["p", "f"] * 4
    assert timed.prefill == pytest.approx([0.01, 0.02, 0.03]) and timed.e2e == pytest.approx([0.11, 0.12, 0.13])
    assert timed.warmup == 1 and timed.stop_reason == "fixed"
    assert timed.seconds == pytest.approx(0.5 + 5.0 + 0.06 + 0.36)      # warm-up included


@pytest.mark.parametrize("enabled_before", [True, False])
def test_rounds_run_with_the_garbage_collector_paused_and_leave_it_as_it_was(enabled_before):
    """No collection inside a timed round (in the test process it would walk the session's whole heap), one
    right before the rounds, and the collector as the caller had it afterwards, even when a call raises."""
    import gc
    clock = FakeClock()
    seen = []

    def call():
        seen.append(gc.isenabled())
        clock.now += 0.01
    collections = gc.get_stats()[2]["collections"]
    (gc.enable if enabled_before else gc.disable)()
    try:
        run_rounds(call, call, Timer(clock=clock), rounds=6, warmup=2)
        assert seen == [False] * 16
        assert gc.isenabled() is enabled_before
        assert gc.get_stats()[2]["collections"] > collections      # the full collection before the rounds

        def failing():
            raise RuntimeError("the model failed")
        with pytest.raises(RuntimeError):
            run_rounds(failing, call, Timer(clock=clock), rounds=6, warmup=0)
        assert gc.isenabled() is enabled_before
    finally:
        gc.enable()


def test_rounds_under_pytest_benchmark(benchmark):
    """benchmark's own statistics are the end-to-end rounds, warm-ups excluded, and the samples pair round
    by round."""
    clock = FakeClock()
    seq = {"p": 0, "f": 0}

    def prefill():
        seq["p"] += 1
        clock.now += 0.001 * seq["p"]

    def full():
        seq["f"] += 1
        clock.now += 0.1 * seq["f"]

    timed = run_rounds(prefill, full, Timer(clock=clock), rounds=5, warmup=2, benchmark=benchmark)
    assert seq == {"p": 7, "f": 7}
    assert timed.prefill == pytest.approx([0.003, 0.004, 0.005, 0.006, 0.007])
    assert timed.e2e == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])
    assert benchmark.stats.stats.rounds == 5
    assert benchmark.stats.stats.median == pytest.approx(0.5) and benchmark.stats.stats.min == pytest.approx(0.3)


def _rounds_of(durations, rule, warmup=0, benchmark=None):
    """run_rounds over a fake model whose full calls last `durations` in turn (prefill: 1 ms)."""
    clock = FakeClock()
    it = iter(durations)

    def full():
        clock.now += next(it)
    return run_rounds(clock.call(0.001), full, Timer(clock=clock), rule, warmup, benchmark)


def test_adaptive_rounds_stop_when_the_median_ci_is_tight():
    # +-0.5 % around 100 ms: at 6 rounds the interval [min, max] is already within 2 %
    steady = [0.1 * (1 + 0.005 * ((i % 3) - 1)) for i in range(100)]
    timed = _rounds_of(steady, latency.StopRule(min_rounds=6, max_rounds=50, time_box_s=60, target_ci=0.02))
    assert (len(timed.e2e), timed.stop_reason) == (6, "ci")
    # +-5 %: the interval narrows with more rounds until it is within 2 % (then stops at once)
    noisy = [0.1 * (1 + 0.05 * ((i * 7) % 11 - 5) / 5) for i in range(200)]
    rule = latency.StopRule(min_rounds=6, max_rounds=200, time_box_s=1e9, target_ci=0.02)
    timed = _rounds_of(noisy, rule)
    n = len(timed.e2e)
    assert timed.stop_reason == "ci" and 6 < n < 200
    assert latency.median_ci(timed.e2e).half_width_rel <= 0.02 < latency.median_ci(timed.e2e[:-1]).half_width_rel


def test_adaptive_rounds_stop_at_the_time_box_but_never_below_min_rounds():
    noisy = [0.1 * (1 + 0.3 * ((i * 7) % 11 - 5) / 5) for i in range(100)]   # +-30 %: never within 2 %
    rule = latency.StopRule(min_rounds=6, max_rounds=100, time_box_s=1.5, target_ci=0.02)
    timed = _rounds_of(noisy, rule)
    assert timed.stop_reason == "time-box"
    mean = statistics.fmean
    assert timed.seconds + mean(timed.e2e) > 1.5                       # one more round would not fit ...
    before_last = timed.seconds - timed.e2e[-1] - timed.prefill[-1]
    assert before_last + mean(timed.e2e[:-1]) <= 1.5                   # ... the last one did, as predicted
    slow = [3.5] * 20                                                         # ZeRO offload: 3.5 s a round
    timed = _rounds_of(slow, latency.StopRule(min_rounds=6, max_rounds=100, time_box_s=10, target_ci=0.0001))
    assert (len(timed.e2e), timed.stop_reason) == (6, "ci")                  # identical rounds: CI is 0
    slow_noisy = [3.5 + 0.5 * (i % 2) for i in range(20)]
    timed = _rounds_of(slow_noisy, latency.StopRule(min_rounds=6, max_rounds=100, time_box_s=10, target_ci=0.02),
                       warmup=1)
    assert (len(timed.e2e), timed.stop_reason) == (6, "time-box")            # the gate's minimum, no more


def test_adaptive_rounds_stop_at_max_rounds_and_fill_benchmark(benchmark):
    noisy = [0.1 * (1 + 0.3 * ((i * 7) % 11 - 5) / 5) for i in range(100)]
    timed = _rounds_of(noisy, latency.StopRule(min_rounds=6, max_rounds=9, time_box_s=1e9, target_ci=0.02),
                       warmup=2, benchmark=benchmark)
    assert (len(timed.e2e), timed.stop_reason) == (9, "max-rounds")
    assert timed.e2e == pytest.approx(noisy[2:11])
    assert benchmark.stats.stats.rounds == 9 and benchmark.stats.stats.data == pytest.approx(noisy[2:11])
    with pytest.raises(ValueError, match="min_rounds"):
        latency.StopRule(min_rounds=7, max_rounds=6)


# --- what is called on a backend -----------------------------------------------------------------------------

class _FakeModel:
    def __init__(self):
        self.calls = []

    def generate(self, **kw):
        self.calls.append(kw)
        return None


def test_model_calls_generate_exactly_one_then_n_tokens_without_logits():
    backend = types.SimpleNamespace(model=_FakeModel(), device="cpu")
    batch = PromptBatch(rows=((1, 2, 3), (4, 5, 6)), pad_token_id=0)
    prefill, full, notes = latency.model_calls(backend, batch, 32)
    prefill()
    full()
    first, second = backend.model.calls
    assert (first["max_new_tokens"], first["min_new_tokens"]) == (1, 1)
    assert (second["max_new_tokens"], second["min_new_tokens"]) == (32, 32)
    assert second["do_sample"] is False and "output_logits" not in second
    assert tuple(second["input_ids"].shape) == (2, 3) and notes == []


class _WordTokenizer:
    """Ids <-> "w<id>" words: a tokenizer whose text round-trips every id."""

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def test_mii_is_timed_through_its_query_handle():
    queries = []

    backend = types.SimpleNamespace(output_is_text=True, tokenizer=_WordTokenizer(),
                                    query_texts=lambda texts, n: queries.append((texts, n)))
    prefill, full, notes = latency.model_calls(backend, PromptBatch(rows=((7, 8),)), 16)
    prefill()
    full()
    assert queries == [(["w7 w8"], 1), (["w7 w8"], 16)]
    assert "mii_query_handle" in notes[0]


def test_mii_batch_figures_say_how_its_pipeline_takes_the_prompts():
    """MII legacy's transformers pipeline generates a query's prompts one after another unless its batch
    size is set (bench C, one H200: mii bs4 590.6 ms, 4.4 x its bs1, where ds batches the rows): the
    figure's notes say so, and say nothing where the pipeline batches them all."""
    def notes_for(rows, pipeline="absent"):
        backend = types.SimpleNamespace(output_is_text=True, tokenizer=_WordTokenizer(), query_texts=lambda texts, n: None)
        if pipeline != "absent":
            backend.pipeline = pipeline
        return latency.model_calls(backend, PromptBatch(rows=rows), 8)[2]

    four = ((1, 2), (3, 4), (5, 6), (7, 8))
    assert notes_for(four, types.SimpleNamespace(_batch_size=None))[-1] == (
        "MII's pipeline generates the 4 prompts of a query one after another (its batch_size is 1, "
        "transformers' default)")
    assert notes_for(four, types.SimpleNamespace(_batch_size=2))[-1] == (
        "MII's pipeline generates the 4 prompts of a query 2 at a time (its batch_size)")
    assert not any("pipeline" in n for n in notes_for(four, types.SimpleNamespace(_batch_size=4)))
    assert not any("pipeline" in n for n in notes_for(((1, 2),), types.SimpleNamespace(_batch_size=None)))
    assert "unless the deployment's pipeline_kwargs set batch_size" in notes_for(four)[-1]   # a server's


def test_latency_batch_rows_are_prompt_len_slices_of_the_text():
    tokens = list(range(1000))
    batch = latency.latency_batch(tokens, 4, 64)
    assert batch.batch_size == 4 and all(len(r) == 64 for r in batch.rows)
    assert len(set(batch.rows)) == 4
    assert all(list(r) == tokens[r[0]:r[0] + 64] for r in batch.rows)
    with pytest.raises(ValueError, match="fewer than"):
        latency.latency_batch(tokens[:10], 1, 64)


def test_threshold_marker():
    def request_with(marker):
        node = types.SimpleNamespace(get_closest_marker=lambda name: marker if name == "neox_latency" else None)
        return types.SimpleNamespace(node=node)

    assert threshold_for(request_with(None), 0.1) == 0.1
    assert threshold_for(request_with(pytest.mark.neox_latency(threshold=0.25).mark), 0.1) == 0.25
    assert threshold_for(request_with(pytest.mark.neox_latency(0.3).mark), 0.1) == 0.3
    with pytest.raises(pytest.fail.Exception, match="fraction of the median"):
        threshold_for(request_with(pytest.mark.neox_latency(threshold="big").mark), 0.1)


def test_profiles():
    from pytest_neoxmii.stats import MIN_SAMPLES
    assert latency.profile_for("cuda:0") == latency.GPU_PROFILE
    assert latency.GPU_PROFILE.prompt_len == 64 and latency.GPU_PROFILE.new_tokens == 32
    gpu = latency.GPU_PROFILE.stop_rule()
    assert (gpu.time_box_s, gpu.target_ci) == (4.0, 0.02) and gpu.max_rounds >= 50
    # an engine streaming its weights is timed on fewer new tokens on a GPU; the others on the reference shape
    assert latency.profile_for("cuda:0", engine="zero").new_tokens == latency.STREAMING_NEW_TOKENS < 32
    assert latency.profile_for("cuda:0", engine="zero").stop_rule() == gpu
    assert latency.profile_for("cuda:0", engine="ds") == latency.profile_for("cuda:0", engine="hf") == latency.GPU_PROFILE
    assert latency.profile_for("cpu", engine="zero") == latency.CPU_PROFILE
    cpu = latency.profile_for("cpu").stop_rule()
    assert cpu.min_rounds == gpu.min_rounds == MIN_SAMPLES         # the gate compares CPU runs too
    fixed = latency.LatencyProfile(prompt_len=16, new_tokens=3, rounds=8).stop_rule()
    assert (fixed.min_rounds, fixed.max_rounds, fixed.target_ci) == (8, 8, None)
    opts = types.SimpleNamespace(latency_time_box=30.0, latency_ci=0.05)
    assert latency.profile_for("cuda:0", opts).stop_rule() == latency.StopRule(MIN_SAMPLES, gpu.max_rounds, 30.0, 0.05)
    unset = types.SimpleNamespace(latency_time_box=None, latency_ci=0.02)
    assert latency.profile_for("cpu", unset) == latency.CPU_PROFILE


class _TimedStandIn:
    """An engine in a worker as measure_backend sees it: generate(batch, n) costs 0.1 s + 0.01 s a token."""
    runs_in_worker = True

    def __init__(self, clock):
        self.clock, self.calls = clock, 0
        self.info = types.SimpleNamespace(backend="ds", dtype="fp16", device="cpu", tensor_parallel=1)

    def generate(self, batch, n):
        self.calls += 1
        self.clock.now += 0.1 + 0.01 * n


@pytest.mark.parametrize("min_warmup_s, warmup, expected", [(0.0, 1, 1), (1.0, 1, 4), (0.1, 2, 2)])
def test_the_first_warmup_round_sizes_the_warmup_and_counts(min_warmup_s, warmup, expected):
    """Rounds of 0.29 s (prefill 0.11 s + 8 tokens 0.18 s): 1 s of warm-up takes 4 rounds, the sizing round
    one of them; the result says how many ran, and only measured rounds are samples."""
    from pytest_neoxmii.outputs import PromptBatch
    clock = FakeClock()
    engine = _TimedStandIn(clock)
    result = latency.measure_backend(engine, PromptBatch(rows=((1, 2),)), 8, 6, warmup,
                                     timer=Timer(clock=clock), min_warmup_s=min_warmup_s)
    assert result.warmup == expected
    assert len(result.e2e) == 6 and engine.calls == 2 * (expected + 6)
    assert result.e2e == pytest.approx([0.18] * 6)


def test_warmup_lasts_long_enough():
    assert latency.warmup_rounds(3, 0.0, 0.2) == 3               # CPU profile: rounds only
    assert latency.warmup_rounds(3, 3.0, 0.2) == 15               # 15 x 0.2 s = 3 s
    assert latency.warmup_rounds(3, 3.0, 2.0) == 3                # slow rounds: the minimum count
    assert latency.warmup_rounds(3, 3.0, 1e-4) == latency.MAX_WARMUP_ROUNDS
    assert latency.warmup_rounds(3, -1.0, 0.2) == 3               # the sizing round already lasted long enough


def test_a_timing_right_after_another_skips_the_clock_warm_up_but_keeps_its_rounds():
    """The minimum warm-up time is for the GPU's clocks: the first timing of a session has it; one that starts
    within GPU_STILL_HOT_S of the previous one's end keeps only its warm-up rounds, and says so."""
    import time as _time
    from contextlib import nullcontext

    from pytest_neoxmii.checks import latency as check

    class Sleeper:            # an engine in a worker: 10 ms a call, whatever the tokens
        runs_in_worker = True
        info = types.SimpleNamespace(backend="ds", dtype="fp16", device="cuda:0", tensor_parallel=1)

        def generate(self, batch, n):
            _time.sleep(0.01)

    class Tok:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}
    engine = Sleeper()
    neox = types.SimpleNamespace(
        settle=lambda: None, backend=lambda name: engine, peer=lambda: engine, tokenizer=Tok(), options=None,
        model=types.SimpleNamespace(spec=None), hardware=None, latency={}, last_timed_at=None,
        timed=lambda phase: nullcontext())
    profile = dataclasses.replace(latency.GPU_PROFILE, prompt_len=4, new_tokens=2, min_warmup_s=0.3,
                                  rounds=6, warmup=1)
    with mock.patch.object(check, "text_tokens", lambda tok: list(range(64))):
        first = check.measure(neox, "ds", 1, profile=profile)
        second = check.measure(neox, "ds", 4, profile=profile)
        neox.last_timed_at -= check.GPU_STILL_HOT_S
        third = check.measure(neox, "ds", 1, profile=profile)
    # 0.3 s of rounds of 20 ms or more: more warm-up rounds than the 1 asked (how many depends on how long the
    # first round took; under -n 2 on two busy cores it took 37 ms and sized 8, so no exact count is asserted)
    assert first.warmup >= 2 and third.warmup >= 2, (first.warmup, third.warmup)
    assert second.warmup == 1
    assert any("no minimum time" in n for n in second.notes) and not any("warm-up" in n for n in first.notes)
    # A profile without a minimum warm-up time (the CPU's) has nothing to drop, and says nothing of it
    no_minimum = dataclasses.replace(profile, min_warmup_s=0.0)
    with mock.patch.object(check, "text_tokens", lambda tok: list(range(64))):
        check.measure(neox, "ds", 1, profile=no_minimum)
        right_after = check.measure(neox, "ds", 4, profile=no_minimum)
    assert right_after.warmup == 1 and not any("warm-up" in n for n in right_after.notes), right_after.notes


def test_a_shorter_generation_is_estimated_round_by_round_from_a_longer_one():
    """Rounds of prefill p and 32 new tokens e: 8 tokens take p + 7 decode steps of that round."""
    prefill = [0.010, 0.012, 0.011, 0.030]
    e2e = [0.010 + 31 * 0.005, 0.012 + 31 * 0.006, 0.011 + 31 * 0.004, 0.030 + 31 * 0.020]
    per_round = sorted([0.010 + 7 * 0.005, 0.012 + 7 * 0.006, 0.011 + 7 * 0.004, 0.030 + 7 * 0.020])
    assert latency.estimated_e2e(prefill, e2e, 32, 8) == pytest.approx((per_round[1] + per_round[2]) / 2)
    assert latency.estimated_e2e(prefill, e2e, 32, 32) == pytest.approx(statistics.median(e2e))
    assert latency.estimated_e2e(prefill, e2e, 32, 1) == pytest.approx(statistics.median(prefill))
    for bad in ((32, 33), (32, 0), (1, 1)):
        with pytest.raises(ValueError, match="estimate"):
            latency.estimated_e2e(prefill, e2e, *bad)


def _side_by_side_session(hf_result):
    from contextlib import nullcontext
    timed = []

    class Engine:
        runs_in_worker = True
        info = types.SimpleNamespace(backend="hf", dtype="fp16", device="cuda:0", tensor_parallel=1)

        def generate(self, batch, n):
            timed.append(n)
    engine = Engine()
    neox = types.SimpleNamespace(
        settle=lambda: None, backend=lambda name: engine, peer=lambda: engine, options=None,
        tokenizer=types.SimpleNamespace(pad_token_id=0), model=types.SimpleNamespace(spec=None), hardware=None,
        latency={} if hf_result is None else {("hf", "fp16", hf_result.bench): hf_result}, last_timed_at=None,
        timed=lambda phase: nullcontext())
    return neox, timed


def _timed_result(backend, new_tokens, e2e, prefill, bs=1):
    return LatencyResult(backend=backend, dtype="fp16", device="cuda:0", batch_size=bs, prompt_len=64,
                         new_tokens=new_tokens, rounds=len(e2e), warmup=1, e2e=list(e2e), prefill=list(prefill))


def test_a_streaming_engines_ratio_uses_hfs_rounds_on_the_longer_shape_without_timing_hf_again():
    from pytest_neoxmii.checks import latency as check
    hf = _timed_result("hf", 32, [0.010 + 31 * 0.005] * 6, [0.010] * 6)
    zero = _timed_result("zero", 8, [0.500] * 6, [0.060] * 6)
    neox, timed = _side_by_side_session(hf)
    e2e, note = check.hf_side_by_side(neox, zero, latency.GPU_PROFILE)
    assert timed == []                                   # no hf timing on the 8-token shape
    assert e2e == pytest.approx(0.010 + 7 * 0.005)
    assert "estimated from its 32-token rounds" in note and "45.00 ms" in note
    # another batch size has no hf rounds to estimate from: hf is timed on the shape itself
    zero4 = _timed_result("zero", 8, [0.500] * 6, [0.060] * 6, bs=4)
    profile = dataclasses.replace(latency.GPU_PROFILE, prompt_len=4, new_tokens=8, rounds=6, min_warmup_s=0.0)
    with mock.patch.object(check, "text_tokens", lambda tok: list(range(64))):
        e2e, note = check.hf_side_by_side(neox, zero4, profile)
    assert note is None and timed and set(timed) == {1, 8}
    # the same shape: hf's own median, as measured
    ds = _timed_result("ds", 32, [0.100] * 6, [0.005] * 6)
    assert check.hf_side_by_side(neox, ds, latency.GPU_PROFILE) == (pytest.approx(hf.e2e_s), None)

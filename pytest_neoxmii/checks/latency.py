"""The latency check of one backend at one batch size: measured in this session with latency.py's timing
(under pytest-benchmark), set beside the HF peer measured side by side, published (benchmark.extra_info,
JUnit properties, the report), then recorded as the baseline (--neox-update-baselines) or gated against it
(stats.compare_latency) through the baseline policy."""
from __future__ import annotations

import dataclasses
import math
import time

import pytest

from pytest_neoxmii import backends as engines
from pytest_neoxmii import gpu_work
from pytest_neoxmii.cases import text_tokens
from pytest_neoxmii.checks.baseline_policy import BaselinePolicy
from pytest_neoxmii.hardware import machine_info
from pytest_neoxmii.latency import (LatencyProfile, LatencyResult, bench_name, estimated_e2e, into_benchmark,
                                    latency_batch, measure_backend, profile_for)
from pytest_neoxmii.session import Record
from pytest_neoxmii.stats import compare_latency, summarize
from pytest_neoxmii.versions import installed_versions

TIMED_PHASE = "timed benchmark calls"
GPU_STILL_HOT_S = 2.0       # a timing that starts this soon after the previous one ends skips the clock warm-up


def _backend_for(neox, name: str):
    """hf is measured at the session's dtype (the peer of the fp32 reference): the same precision the
    DeepSpeed backends run, so the ratio compares engines, not precisions."""
    return neox.peer() if engines.is_reference(name) else neox.backend(name)


def measure(neox, name: str, batch_size: int, benchmark=None, profile: LatencyProfile | None = None) \
        -> LatencyResult:
    """Measure one backend at one batch size in this session (kept in neox.latency for the report)."""
    neox.settle()                  # timing runs alone: no prelaunched worker still loading beside it
    backend = _backend_for(neox, name)        # (after settle: it may have deployed a broken engine again)
    profile = profile or profile_for(backend.info.device, neox.options, name)
    hot = neox.last_timed_at is not None and time.perf_counter() - neox.last_timed_at < GPU_STILL_HOT_S
    hot = hot and profile.min_warmup_s > 0      # (the CPU's profile has no minimum warm-up time to drop)
    if hot:
        # The minimum warm-up is for the GPU's clocks, which this session's previous timing has just raised
        # (on one H200 the SM clock went from 345 to 1980 MHz within 0.5 s of work, and stayed there through
        # seconds without any): the warm-up rounds alone remain, for the caches of the new shape.
        profile = dataclasses.replace(profile, min_warmup_s=0.0)
    tok = neox.tokenizer
    batch = latency_batch(text_tokens(tok), batch_size, profile.prompt_len,
                          tok.pad_token_id if tok.pad_token_id is not None else 0)
    with neox.timed(TIMED_PHASE):
        result = measure_backend(backend, batch, profile.new_tokens, profile.stop_rule(), profile.warmup,
                                 spec=neox.model.spec, hardware=neox.hardware, benchmark=benchmark,
                                 min_warmup_s=profile.min_warmup_s,
                                 gpu_work=bool(getattr(neox.options, "gpu_work", False)))
    neox.last_timed_at = time.perf_counter()
    result.backend = name
    if hot:
        result.notes.append(f"warm-up: {result.warmup} round(s), no minimum time: the GPU ran timed work "
                            f"less than {GPU_STILL_HOT_S:g} s before")
    neox.latency[(name, result.dtype, result.bench)] = result
    return result


def hf_side_by_side(neox, result: LatencyResult, profile: LatencyProfile) -> tuple[float | None, str | None]:
    """The HF peer's end-to-end median for the same batch and shape in this session, and a note when it was
    not measured on that shape: reused when its own test ran already; estimated from its rounds on the same
    prompt and batch when it ran on more new tokens; else measured now. The ratio is only meaningful side by
    side, never against stored numbers."""
    if engines.is_reference(result.backend):
        return result.e2e_s, None
    ref = engines.reference_name()
    found = neox.latency.get((ref, result.dtype, result.bench))
    if found is not None:
        return found.e2e_s, None
    longer = [r for (name, dtype, _), r in neox.latency.items()
              if name == ref and dtype == result.dtype and r.batch_size == result.batch_size
              and r.prompt_len == result.prompt_len and r.new_tokens > result.new_tokens]
    if longer:
        # A streaming engine is timed on fewer new tokens (latency.STREAMING_NEW_TOKENS). hf's rounds on the
        # longer shape give its time on this one, round by round: a greedy decode step costs the same at
        # every step of these short contexts. Timing hf again on the short shape took 2-7 s a batch size.
        peer = min(longer, key=lambda r: r.new_tokens)
        estimate = estimated_e2e(peer.prefill, peer.e2e, peer.new_tokens, result.new_tokens)
        return estimate, (f"ratio to hf's {result.new_tokens}-token time estimated from its {peer.new_tokens}-"
                          f"token rounds in this session (TTFT + {result.new_tokens - 1} x TPOT, round by round): "
                          f"{estimate * 1e3:.2f} ms")
    measured = measure(neox, ref, result.batch_size, profile=profile)
    measured.notes.append(f"measured for the {result.backend}/hf ratio (no hf latency test ran before)")
    return measured.e2e_s, None


def timed_for_a_ratio(neox, name: str, bench: str, benchmark=None) -> LatencyResult | None:
    """The reference's figure for `bench`, where an engine's test timed it earlier in this session for its
    ratio (hf_side_by_side): the reference's own test reports those rounds (into its benchmark fixture too)
    instead of timing the same shape again. Where the engines take turns, each engine's block runs before the
    reference's timed tests (plugin.run_order): on one H200 the same hf rounds were timed twice, 3.9 s a batch
    size. None for an engine, or where nothing timed the reference on this shape."""
    if not engines.is_reference(name):
        return None
    earlier = neox.latency.get((name, neox.dtype, bench))
    if earlier is None:
        return None
    if benchmark is not None:
        into_benchmark(benchmark, earlier.e2e)
    earlier.notes.append("reported by its own test from those rounds, not timed again")
    return earlier


def threshold_for(request, default: float) -> float:
    """The neox_latency(threshold=...) marker's threshold, else the session's --neox-latency-threshold."""
    marker = request.node.get_closest_marker("neox_latency") if request is not None else None
    if marker is None:
        return default
    value = marker.kwargs.get("threshold", marker.args[0] if marker.args else default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 10:
        pytest.fail(f"neox_latency(threshold=...) is a fraction of the median such as 0.2, got {value!r}",
                    pytrace=False)
    return float(value)


def _publish(result: LatencyResult, benchmark, request) -> dict:
    metrics = {k: v for k, v in result.metrics().items() if not isinstance(v, float) or math.isfinite(v)}
    if benchmark is not None:
        benchmark.extra_info.update(metrics)
    if request is not None:
        for k, v in metrics.items():
            if k not in ("backend", "dtype"):
                request.node.user_properties.append((f"latency_{k}", v))
    return metrics


def check_latency(neox, backend_name: str, batch_size: int, benchmark=None, request=None,
                  profile: LatencyProfile | None = None) -> LatencyResult:
    """The latency acceptance check of one backend at one batch size.

    Reads the baseline first (an unusable file fails at once, naming it), measures under pytest-benchmark,
    measures the HF peer side by side for the ratio, publishes the metrics (benchmark.extra_info, JUnit
    properties, the report), then either records the baseline (--neox-update-baselines) or runs the
    regression gate; a missing baseline, or one from another GPU class only, skips the gate with the reason."""
    if benchmark is not None and getattr(benchmark, "disabled", False):
        # (pytest-xdist disables it too, but a session with a model refuses xdist: options.py)
        pytest.skip("pytest-benchmark is disabled (--benchmark-disable): latency is not measured in this run")
    opts = neox.options
    if batch_size > neox.max_batch:
        # DeepSpeed's inference workspace is sized once, for the largest batch of the case set; a larger
        # batch would read the wrong cache rows (see TorchModelBackend.size_workspace).
        pytest.skip(f"batch {batch_size} is larger than the case set's largest batch ({neox.max_batch}), which "
                    "sizes DeepSpeed's workspace")
    backend = _backend_for(neox, backend_name)
    profile = profile or profile_for(backend.info.device, opts, backend_name)
    policy = BaselinePolicy.of(neox, backend_name, backend.info, request)
    cls = policy.gpu_class
    bench = bench_name(batch_size, profile.prompt_len, profile.new_tokens)
    threshold = threshold_for(request, opts.latency_threshold)
    # Read first: an unusable file fails before the minutes of timing. A missing one is decided after the
    # measurement, which the report shows either way.
    baseline = None if policy.recording else policy.read(lambda store: store.latency(policy.key, cls, bench))

    result = timed_for_a_ratio(neox, backend_name, bench, benchmark) or measure(neox, backend_name, batch_size,
                                                                             benchmark, profile)
    hf_e2e, how = hf_side_by_side(neox, result, profile)
    result.ratio_to_hf = result.e2e_s / hf_e2e if hf_e2e else None
    if how:
        result.notes.append(how)
    print(result.describe())

    def finish(passed, verdict: str, summary: str, extra: dict | None = None):
        result.gate = {"verdict": verdict, "summary": summary, "gpu_class": cls, **(extra or {})}
        metrics = _publish(result, benchmark, request)
        neox.record(Record("latency", backend_name, bench, passed, metrics, summary))

    if policy.recording:
        entry = {"samples": result.e2e, "stats": summarize(result.e2e),
                 "extra": {k: v for k, v in result.as_dict().items()
                           if k not in ("e2e_samples_s", "gate", "backend", "dtype")},
                 "versions": installed_versions(), "machine": machine_info(neox.hardware)}
        path = policy.record(lambda store: store.put_latency(policy.key, cls, bench, entry))
        finish(True, "recorded", f"baseline recorded for GPU class {cls} in {path}")
        print(f"latency baseline {bench} for {cls} written to {path}")
        return result

    if baseline is None:
        others = policy.read(lambda store: store.latency_other_classes(policy.key, bench, cls))
        if others:
            reason = (f"latency gate skipped: {policy.where} has a {bench} baseline for GPU class "
                      f"{', '.join(others)} only, this machine is {cls} (timings of another GPU class are not "
                      f"comparable); record one here with: {policy.record_command}")
            finish(None, "other-gpu-class", reason, {"classes_found": others})
        else:
            reason = policy.missing(f"latency baseline {bench} for GPU class {cls}")
            finish(None, "no-baseline", reason)
        pytest.skip(reason)

    cmp = compare_latency(baseline["samples"], result.e2e, threshold=threshold)
    message = f"{backend_name} {bench} on {cls}: {cmp.message()}"
    work = _gate_gpu_work(opts, baseline, result)
    if work is not None:
        message += f"; {work.message()}"
    print(message)
    failed = cmp.failed or (work is not None and work.failed)
    finish(not failed, cmp.verdict, message,
           {"baseline_median_s": cmp.baseline_median, "current_median_s": cmp.current_median,
            "change_pct": cmp.change_pct, "p_value": cmp.p_value, "threshold": threshold,
            "baseline_recorded_at": baseline.get("recorded_at"),
            **({"gpu_work_verdict": work.verdict, "gpu_work_changes_pct":
                {k: v * 100 for k, v in work.changes.items()}} if work is not None else {})})
    if failed:
        what = "latency regression" if cmp.failed else "GPU work regression"
        pytest.fail(f"{what}: {message}", pytrace=False)
    return result


def _gate_gpu_work(opts, baseline: dict, result: LatencyResult):
    """--neox-gpu-work: this call's GPU work against the baseline's (gpu_work.py), or None where either side
    has none (a note says why, in the result and on the terminal)."""
    if not getattr(opts, "gpu_work", False) or result.gpu_work is None:
        return None
    recorded = gpu_work.from_metrics(baseline.get("extra") or {})
    if recorded is None:
        note = ("GPU work not gated: the baseline has none (record it with --neox-update-baselines "
                "--neox-gpu-work)")
        result.notes.append(note)
        print(note)
        return None
    return gpu_work.compare(recorded, result.gpu_work)

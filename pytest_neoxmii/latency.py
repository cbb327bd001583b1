"""Timed model calls: latency per backend and batch size, set against the HF reference measured in the same
session and against the weight-streaming floor, and gated against a stored baseline.

What is measured, per round (all timed regions are bracketed by torch.cuda.synchronize on a GPU and timed
with CUDA events; on the CPU with time.perf_counter):

* prefill: time to first token (TTFT), a greedy generation of exactly 1 new token from the prompt;
* end-to-end: a greedy generation of exactly N new tokens (the number the regression gate compares);
* decode: time per output token (TPOT) = (end-to-end - prefill) / (N - 1), paired within the round.

tokens/s is batch x N / end-to-end. The weight-streaming floor of one decode step is the bytes of the
weights (per GPU with tensor parallelism) over the GPU's memory bandwidth: no decoder can emit a token faster
than it can read its weights once. floor % = 100 x floor / TPOT, i.e. how close decoding runs to that limit
(100% = at the memory-bandwidth limit).

Speed targets are never asserted: the only latency assertion is the regression gate (stats.compare_latency)
against a baseline recorded with --neox-update-baselines on the same GPU class, in checks/latency.py (the
pytest layer); this module is the timing, free of pytest.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pytest_neoxmii import backends as engines
from pytest_neoxmii import gpu_work as gpu_work_module   # (measure_backend's `gpu_work` is the flag)
from pytest_neoxmii.gpu_work import GpuWork, GpuWorkUnavailable
from pytest_neoxmii.samples import median_ci
from pytest_neoxmii.stats import MIN_SAMPLES, summarize

# --- memory bandwidth ---------------------------------------------------------------------------------
# Peak HBM bandwidth (bytes/s) from the vendors' data sheets, matched on the name torch reports
# (torch.cuda.get_device_properties(i).name). First match wins, so the more specific patterns come first.
# Anything else is unknown: no floor rather than a wrong one.
BANDWIDTHS: tuple[tuple[str, float, str], ...] = (
    (r"H100.*PCIe", 2.0e12, "H100 PCIe"),
    (r"H100.*(SXM|HBM3)", 3.35e12, "H100 SXM"),
    (r"H200", 4.8e12, "H200"),
    (r"A100.*80\s*GB", 2.0e12, "A100 80GB"),
    (r"A100.*40\s*GB", 1.555e12, "A100 40GB"),
)


def memory_bandwidth(gpu_name: str | None) -> float | None:
    """Peak memory bandwidth in bytes/s of a GPU by its name, or None when unknown (or no GPU)."""
    if not gpu_name:
        return None
    for pattern, value, _label in BANDWIDTHS:
        if re.search(pattern, gpu_name, re.IGNORECASE):
            return value
    return None


def weight_streaming_floor(weight_bytes: int, bandwidth: float | None, tp: int = 1) -> float | None:
    """Seconds one decode step needs at least: each GPU reads its 1/tp of the weights once per token."""
    if bandwidth is None or bandwidth <= 0 or weight_bytes <= 0:
        return None
    return weight_bytes / max(int(tp), 1) / bandwidth


def floor_pct(floor_s: float | None, tpot_s: float | None) -> float | None:
    """The floor as a percentage of the measured time per output token (100 = at the bandwidth limit)."""
    if floor_s is None or tpot_s is None or not tpot_s > 0:
        return None
    return 100.0 * floor_s / tpot_s


def decode_samples(prefill: Sequence[float], e2e: Sequence[float], new_tokens: int) -> list[float]:
    """Time per output token of each round: (end-to-end - prefill) / (N - 1), prefill and end-to-end of the
    same round paired. Empty for N = 1 (there is no decode step)."""
    if len(prefill) != len(e2e):
        raise ValueError(f"{len(prefill)} prefill samples but {len(e2e)} end-to-end samples: rounds must pair")
    if new_tokens < 2:
        return []
    return [(e - p) / (new_tokens - 1) for p, e in zip(prefill, e2e)]


def estimated_e2e(prefill: Sequence[float], e2e: Sequence[float], measured_tokens: int, tokens: int) -> float:
    """The median end-to-end time of a generation of `tokens` new tokens, from rounds that generated
    `measured_tokens` (more): each round's prefill plus tokens - 1 of its decode steps (decode_samples)."""
    if not 1 <= tokens <= measured_tokens or measured_tokens < 2:
        raise ValueError(f"estimate {tokens} new tokens from rounds of {measured_tokens}: needs "
                         "1 <= tokens <= measured tokens, and at least 2 measured")
    steps = decode_samples(prefill, e2e, measured_tokens)
    return float(statistics.median(p + (tokens - 1) * s for p, s in zip(prefill, steps)))


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


# --- profiles -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StopRule:
    """When timing stops adding measured rounds: never before min_rounds; then as soon as the 95 % confidence
    interval of the end-to-end median is within +-target_ci of it ("ci"), or at max_rounds ("max-rounds"), or
    when one more round would end past the time box, counted from the start of the warm-up ("time-box").
    min_rounds wins over the box: a slow-by-design engine (ZeRO offload) still gets the samples the gate
    needs, and no more. target_ci None: exactly max_rounds rounds ("fixed")."""
    min_rounds: int
    max_rounds: int
    time_box_s: float = math.inf
    target_ci: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_rounds <= self.max_rounds:
            raise ValueError(f"rounds: need 1 <= min_rounds ({self.min_rounds}) <= max_rounds ({self.max_rounds})")

    def reason_to_stop(self, e2e: Sequence[float], elapsed_s: float) -> str | None:
        n = len(e2e)
        if n < self.min_rounds:
            return None
        if self.target_ci is None:
            return "fixed" if n >= self.max_rounds else None
        ci = median_ci(e2e)
        if ci is not None and ci.half_width_rel <= self.target_ci:
            return "ci"
        if n >= self.max_rounds:
            return "max-rounds"
        if elapsed_s + statistics.fmean(e2e) > self.time_box_s:   # prefill is small next to a full round
            return "time-box"
        return None


@dataclass(frozen=True)
class LatencyProfile:
    """The shape that is timed, the warm-up, and when timing stops (see StopRule): adaptive by default;
    `rounds` fixes the count instead."""
    prompt_len: int
    new_tokens: int
    rounds: int | None = None   # a fixed number of measured rounds (no early stop, no time box)
    warmup: int = 1             # at least this many warm-up rounds ...
    min_warmup_s: float = 0.0   # ... and at least this long (GPU clocks ramp up from idle over seconds)
    min_rounds: int = MIN_SAMPLES
    max_rounds: int = 100
    time_box_s: float = 10.0    # per test and batch size, warm-up included (--neox-latency-time-box)
    target_ci: float = 0.02     # +-2 % of the median at 95 % (--neox-latency-ci)

    def stop_rule(self) -> StopRule:
        if self.rounds is not None:
            return StopRule(min_rounds=self.rounds, max_rounds=self.rounds)
        return StopRule(self.min_rounds, self.max_rounds, self.time_box_s, self.target_ci)


# GPU: the reference numbers' shape (64-token prompt, 32 new tokens); a median within +-2 % at 95 %, or what
# 4 s of timing gives, warm-up included: 12-24 rounds of the 150-300 ms rounds measured on an H200 (the
# Mann-Whitney gate sees a 10-15 % shift from a dozen rounds). Why 4 s and not 5: replayed on the rounds of 96
# figures from 12 sessions on H200s (scripts/time_box_whatif.py, docs/SPEED.md sixteenth round), a 4 s box
# takes 4.3 s off a session (1.2-6.0 s) and moves the figures' median half-width from 4.2 to 4.3 %: the
# host's slow phases, not the round count, set most intervals there.
# CPU: the plumbing and the gate run, kept short (CI is CPU-only; a CPU figure says nothing of a GPU's): a
# 16-token prompt and 2 new tokens (one decode step for TPOT), the fewest rounds the gate compares, more only
# while they fit 1 s. On 4 new tokens the CPU timing took 19-20 s of the 2-core CI machine's 145 s session
# (pythia-160m, synthetic weights).
GPU_PROFILE = LatencyProfile(prompt_len=64, new_tokens=32, warmup=1, min_warmup_s=1.0, time_box_s=4.0)
CPU_PROFILE = LatencyProfile(prompt_len=16, new_tokens=2, warmup=1, time_box_s=1.0)
BATCH_SIZES = (1, 4)
# An engine that streams its weights from CPU memory at every forward (ZeRO-Inference: rounds of 2.3-3.6 s
# for 32 tokens of pythia-160m, synthetic weights, on an H200) is timed on 4 new tokens on a GPU: the
# gate's 6 rounds then take seconds, not half a minute, and its time per output token stays the same measure
# (3 decode steps a round). On 8 tokens its two tests took 12.4 s of a warm session's 72 s on one H200
# (pythia-160m, synthetic weights), each bound by the 6 rounds the gate needs. Its ratio to hf is taken
# against hf's rounds on the longer shape (checks/latency.py, hf_side_by_side).
STREAMING_NEW_TOKENS = 4


MAX_WARMUP_ROUNDS = 50


def warmup_rounds(min_rounds: int, min_seconds: float, round_s: float) -> int:
    """Warm-up rounds: at least min_rounds, and enough rounds of round_s seconds to last min_seconds."""
    if min_seconds <= 0 or round_s <= 0:
        return min_rounds
    return max(min_rounds, min(MAX_WARMUP_ROUNDS, math.ceil(min_seconds / round_s)))


def profile_for(device: str, options=None, engine: str | None = None) -> LatencyProfile:
    """The device's profile (on a GPU, a shorter generation for an engine that streams its weights), with the
    session's --neox-latency-time-box / --neox-latency-ci when set."""
    on_gpu = device.startswith("cuda")
    profile = GPU_PROFILE if on_gpu else CPU_PROFILE
    changes = {}
    if on_gpu and engine in engines.ENGINES and not engines.ENGINES[engine].weights_on_gpu:
        changes["new_tokens"] = STREAMING_NEW_TOKENS
    if options is not None and getattr(options, "latency_time_box", None) is not None:
        changes["time_box_s"] = options.latency_time_box
    if options is not None and getattr(options, "latency_ci", None) is not None:
        changes["target_ci"] = options.latency_ci
    return dataclasses.replace(profile, **changes) if changes else profile


def bench_name(batch_size: int, prompt_len: int, new_tokens: int) -> str:
    """The baseline entry a measurement is filed under: every parameter that changes the number is in it."""
    return f"generate-bs{batch_size}-p{prompt_len}-n{new_tokens}"


# --- timing -------------------------------------------------------------------------------------------

class Timer:
    """Times one call. On a CUDA device: synchronize, record a start event, call, record an end event,
    synchronize, elapsed time between the events (GPU work queued before the call never leaks in, work
    queued by it never escapes). On the CPU (or with a `clock` given, for tests): clock() around the call,
    with `sync()` (default: nothing) before and after."""

    def __init__(self, device: str = "cpu", clock: Callable[[], float] | None = None,
                 sync: Callable[[], None] | None = None):
        self.device = device
        self.cuda = device.startswith("cuda") and clock is None
        self.clock = clock or time.perf_counter
        self.sync = sync or (lambda: None)

    def measure(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            import torch
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3
        self.sync()
        t0 = self.clock()
        fn()
        self.sync()
        return self.clock() - t0


@dataclass
class TimedRounds:
    """What run_rounds measured: paired samples of the measured rounds (warm-ups excluded), how many warm-up
    rounds ran, why the rounds stopped (StopRule) and how long it all took (warm-up included)."""
    prefill: list[float]
    e2e: list[float]
    warmup: int
    stop_reason: str
    seconds: float


def run_rounds(prefill_call: Callable[[], object], full_call: Callable[[], object], timer: Timer,
               rounds: int | StopRule, warmup: int, benchmark=None, started: float | None = None) -> TimedRounds:
    """`warmup` rounds whose samples are dropped, then measured rounds until `rounds` says stop (a StopRule,
    or a fixed count), each a prefill call then a full call, timed by `timer`, with Python's garbage collector
    paused (gc_paused). The time box counts from `started` (timer.clock() values; default: now).

    With pytest-benchmark's fixture the end-to-end samples become its statistics (one round each), so its
    table, JSON and comparisons are the end-to-end latency. pedantic() would need the round count up front,
    which adaptive rounds only know at the end: the samples go in the way pedantic's own loop adds them."""
    rule = rounds if isinstance(rounds, StopRule) else StopRule(min_rounds=rounds, max_rounds=rounds)
    t0 = timer.clock() if started is None else started
    prefill: list[float] = []
    e2e: list[float] = []
    with gc_paused():
        for _ in range(warmup):
            timer.measure(prefill_call)
            timer.measure(full_call)
        while True:
            prefill.append(timer.measure(prefill_call))
            e2e.append(timer.measure(full_call))
            reason = rule.reason_to_stop(e2e, timer.clock() - t0)
            if reason:
                break
    if benchmark is not None:
        into_benchmark(benchmark, e2e)
    return TimedRounds(prefill=prefill, e2e=e2e, warmup=warmup, stop_reason=reason, seconds=timer.clock() - t0)


@contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the block (as timeit does), after one collection, and back
    as it was after: a greedy generate allocates Python objects at every step, so a collection would fall
    inside timed rounds, and in the test process it walks the whole session's heap. It is not what makes the
    hf figures noisy: on one H200 (pythia-160m synthetic, hf fp16, scripts/latency_noise.py) a pytest-sized
    heap gave +-10.2 % with the GC on and +-1.4 % off in one run, and +-4.2 % and +-5.0 % in the next; the
    drift there was the CPU's own speed (docs/SPEED.md, the fifth round)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def into_benchmark(benchmark, samples: Sequence[float]) -> None:
    """pytest-benchmark's statistics from samples timed here (its _raw_pedantic does exactly this per round;
    the private names are pinned by pyproject's pytest-benchmark range)."""
    stats = benchmark._make_stats(1)
    for duration in samples:
        stats.update(duration)
    benchmark._mode = "benchmark.pedantic(...)"     # used once, as pedantic leaves it


# --- results ------------------------------------------------------------------------------------------

@dataclass
class LatencyResult:
    backend: str
    dtype: str
    device: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    rounds: int
    warmup: int
    e2e: list[float]                      # seconds, one per measured round
    prefill: list[float]                  # seconds, paired with e2e
    weight_bytes: int = 0
    tp: int = 1
    gpu_name: str | None = None
    bandwidth: float | None = None        # bytes/s, None when unknown
    peak_gpu_memory_bytes: int | None = None
    ratio_to_hf: float | None = None      # median end-to-end / the HF peer's, same session and batch
    floor_applies: bool = True            # False for ZeRO-Inference: its weights stream over PCIe, not HBM
    gate: dict | None = None              # the regression gate's outcome (set by checks/latency.py)
    notes: list[str] = field(default_factory=list)
    stop_reason: str = "fixed"            # why the rounds stopped: ci, time-box, max-rounds or fixed (StopRule)
    timing_s: float | None = None         # seconds the timing took, warm-up included
    gpu_work: GpuWork | None = None       # of one full call (--neox-gpu-work), else None

    def __post_init__(self) -> None:
        if self.backend in engines.ENGINES and not engines.ENGINES[self.backend].weights_on_gpu:
            self.floor_applies = False

    @property
    def bench(self) -> str:
        return bench_name(self.batch_size, self.prompt_len, self.new_tokens)

    @property
    def tpot_samples(self) -> list[float]:
        return decode_samples(self.prefill, self.e2e, self.new_tokens)

    @property
    def e2e_s(self) -> float:
        return _median(self.e2e)

    @property
    def ttft_s(self) -> float:
        return _median(self.prefill)

    @property
    def tpot_s(self) -> float | None:
        return _median(self.tpot_samples)

    @property
    def e2e_ci(self):
        """95 % confidence interval of the end-to-end median (samples.MedianCI), None below 6 rounds."""
        return median_ci(self.e2e)

    @property
    def tokens_per_s(self) -> float | None:
        e2e = self.e2e_s
        return self.batch_size * self.new_tokens / e2e if e2e and e2e > 0 else None

    @property
    def floor_s(self) -> float | None:
        if not self.floor_applies:
            return None
        return weight_streaming_floor(self.weight_bytes, self.bandwidth, self.tp)

    @property
    def floor_pct(self) -> float | None:
        return floor_pct(self.floor_s, self.tpot_s)

    @property
    def floor_note(self) -> str:
        if not self.floor_applies:
            return "not applicable (weights stream from CPU/NVMe over PCIe)"
        if self.bandwidth is None:
            return f"unknown (no memory bandwidth known for {self.gpu_name or 'the CPU'})"
        return f"{self.weight_bytes / 1e9:.3g} GB / tp {self.tp} / {self.bandwidth / 1e12:.3g} TB/s"

    def metrics(self) -> dict:
        """Flat numbers for benchmark.extra_info, JUnit properties and the report (seconds, bytes)."""
        e2e = summarize(self.e2e)
        pre = summarize(self.prefill)
        tpot = self.tpot_samples
        out = {
            "bench": self.bench, "backend": self.backend, "dtype": self.dtype, "batch_size": self.batch_size,
            "prompt_tokens": self.prompt_len, "new_tokens": self.new_tokens, "rounds": self.rounds,
            "warmup_rounds": self.warmup, "stop_reason": self.stop_reason, "timing_s": self.timing_s,
            "e2e_p50_s": e2e["p50"], "e2e_p90_s": e2e["p90"], "e2e_p99_s": e2e["p99"],
            "e2e_mean_s": e2e["mean"], "e2e_stddev_s": e2e["stddev"],
            "e2e_ci_low_s": e2e["median_ci_low"], "e2e_ci_high_s": e2e["median_ci_high"],
            "e2e_ci_half_width_pct": _pct(e2e["median_ci_half_width_rel"]),
            "ttft_ci_half_width_pct": _pct(pre["median_ci_half_width_rel"]),
            "tpot_ci_half_width_pct": _pct(summarize(tpot)["median_ci_half_width_rel"]) if tpot else None,
            "ttft_p50_s": pre["p50"], "ttft_p90_s": pre["p90"], "ttft_p99_s": pre["p99"],
            "tpot_p50_s": self.tpot_s,
            "tpot_p90_s": summarize(tpot)["p90"] if tpot else None,
            "tpot_p99_s": summarize(tpot)["p99"] if tpot else None,
            "tokens_per_s": self.tokens_per_s,
            "peak_gpu_memory_bytes": self.peak_gpu_memory_bytes,
            "ratio_to_hf": self.ratio_to_hf,
            "floor_s": self.floor_s,
            "floor_pct": self.floor_pct,
            "floor": self.floor_note,
            "gpu": self.gpu_name or "cpu",
            "gpu_operations_per_call": self.gpu_work.operations if self.gpu_work else None,
            "gpu_busy_s_per_call": self.gpu_work.busy_s if self.gpu_work else None,
        }
        if self.gate:
            out["gate_verdict"] = self.gate.get("verdict")
            if self.gate.get("gpu_work_verdict"):
                out["gpu_work_verdict"] = self.gate["gpu_work_verdict"]
        return out

    def as_dict(self) -> dict:
        """Everything, samples included: the report's JSON summary."""
        d = self.metrics()
        d.update({"e2e_samples_s": list(self.e2e), "prefill_samples_s": list(self.prefill),
                  "tpot_samples_s": self.tpot_samples, "device": self.device, "tp": self.tp,
                  "weight_bytes": self.weight_bytes, "bandwidth_bytes_per_s": self.bandwidth,
                  "gate": self.gate, "notes": list(self.notes)})
        return d

    def describe(self) -> str:
        def ms(x):
            return "-" if x is None else f"{x * 1e3:.2f} ms"
        ci = self.e2e_ci
        spread = f" +-{ci.half_width_rel * 100:.1f}%" if ci else ""
        parts = [f"{self.backend} {self.dtype} batch {self.batch_size}: end-to-end p50 {ms(self.e2e_s)}{spread} "
                 f"({len(self.e2e)} rounds, stop: {self.stop_reason})",
                 f"TTFT {ms(self.ttft_s)}", f"TPOT {ms(self.tpot_s)}"]
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        if self.ratio_to_hf is not None and not engines.is_reference(self.backend):
            parts.append(f"{self.backend}/hf {self.ratio_to_hf:.2f}")
        pct = self.floor_pct
        parts.append(f"floor {ms(self.floor_s)} = {pct:.1f}% of TPOT" if pct is not None
                     else f"floor {self.floor_note}")
        if self.gpu_work:
            parts.append(f"per call {self.gpu_work.describe()}")
        return ", ".join(parts)


# --- model calls --------------------------------------------------------------------------------------

def latency_batch(tokens: Sequence[int], batch_size: int, prompt_len: int, pad_token_id: int = 0):
    """batch_size rows of prompt_len tokens of the fixed text, each row starting elsewhere in it."""
    from pytest_neoxmii.outputs import PromptBatch
    n = len(tokens)
    if n < prompt_len:
        raise ValueError(f"the fixed text has {n} tokens, fewer than the {prompt_len}-token latency prompt")
    rows = []
    for i in range(batch_size):
        start = (i * 97) % (n - prompt_len + 1)
        rows.append(tuple(tokens[start:start + prompt_len]))
    return PromptBatch(rows=tuple(rows), pad_token_id=pad_token_id)


def _pipeline_batching(backend, prompts: int) -> list[str]:
    """How MII's pipeline takes a query of several prompts. MII legacy builds a transformers pipeline,
    whose batch_size is 1 unless the deployment's pipeline_kwargs set one, so the prompts of a query are
    generated one after another. This explains mii's bs4 figure: about 4 x its bs1 (one H200, pythia-160m
    synthetic: 590.6 ms against 132.7 ms), where ds batches the rows."""
    pipeline = getattr(backend, "pipeline", None)
    if pipeline is None:                     # a server's pipeline lives in its processes
        return ["MII's pipeline generates a query's prompts one after another unless the deployment's "
                "pipeline_kwargs set batch_size (transformers' default: 1)"]
    per_call = getattr(pipeline, "_batch_size", None) or 1
    if per_call >= prompts:
        return []
    return [f"MII's pipeline generates the {prompts} prompts of a query "
            + ("one after another (its batch_size is 1, transformers' default)" if per_call == 1
               else f"{per_call} at a time (its batch_size)")]


def model_calls(backend, batch, new_tokens: int) -> tuple[Callable[[], object], Callable[[], object], list[str]]:
    """(prefill call, full call, notes) for a backend: what a user of that backend runs, nothing more.

    MII: a query through its handle (text in, text out: tokenization and MII's pipeline are part of what
    MII users wait for). An engine in worker processes: its own generate() over the channel. Every other
    backend: the model's greedy generate() on ids already on the device, without the per-step logits the
    parity checks ask for."""
    if getattr(backend, "output_is_text", False):     # the engine's trait (backends/base.py); stand-ins may lack it
        texts = [backend.tokenizer.decode(list(row)) for row in batch.rows]
        notes = ["timed through mii_query_handle (text in, text out)"]
        if any(backend.tokenizer(t, add_special_tokens=False)["input_ids"] != list(r)
               for t, r in zip(texts, batch.rows)):
            notes.append("prompt text does not re-tokenize to the same ids: prompt lengths are approximate")
        if batch.batch_size > 1:
            notes.extend(_pipeline_batching(backend, batch.batch_size))
        return (lambda: backend.query_texts(texts, 1)), (lambda: backend.query_texts(texts, new_tokens)), notes
    if getattr(backend, "runs_in_worker", False):     # no .model in this process
        return ((lambda: backend.generate(batch, 1)), (lambda: backend.generate(batch, new_tokens)),
                ["timed through the worker channel (generate, with the per-step top-k the ranks return)"])

    import torch
    ids, mask = batch.padded()
    ids, mask = ids.to(backend.device), mask.to(backend.device)
    model = backend.model

    def generate(n: int):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, num_beams=1, pad_token_id=batch.pad_token_id)
    return (lambda: generate(1)), (lambda: generate(new_tokens)), []


def measure_backend(backend, batch, new_tokens: int, rounds: int | StopRule, warmup: int, *, spec=None,
                    hardware=None, benchmark=None, timer: Timer | None = None,
                    min_warmup_s: float = 0.0, gpu_work: bool = False) -> LatencyResult:
    """Time rounds of prefill + full generation of one loaded backend, as `rounds` (a StopRule or a fixed
    count) says, after `warmup` rounds (more if they would last less than min_warmup_s); with `gpu_work`, then
    profile one more full call on a GPU (gpu_work.py)."""
    in_worker = getattr(backend, "measure_latency", None)
    if in_worker is not None:       # an isolated engine: timed in its worker, as this function times it here
        result = in_worker(batch, new_tokens, rounds, warmup, spec=spec, hardware=hardware,
                           min_warmup_s=min_warmup_s, gpu_work=gpu_work)
        if benchmark is not None:
            into_benchmark(benchmark, result.e2e)
        return result
    info = backend.info
    device = info.device
    # Workers' GPUs ("cuda:0,1") are not this process's: a wall clock, and their memory is not ours to read.
    local = not getattr(backend, "runs_in_worker", False)
    timer = timer or Timer(device if local else "cpu")
    prefill_call, full_call, notes = model_calls(backend, batch, new_tokens)
    on_gpu = device.startswith("cuda")
    if on_gpu and local:
        import torch
        torch.cuda.reset_peak_memory_stats(device)
    started = timer.clock()
    sized = 0
    if min_warmup_s > 0 and warmup > 0:
        # The first warm-up round sizes the rest: enough to last min_warmup_s (it counts against the time
        # box, as the whole warm-up does).
        first = timer.measure(prefill_call) + timer.measure(full_call)
        sized = 1
        warmup = warmup_rounds(warmup, min_warmup_s, first) - sized
    timed = run_rounds(prefill_call, full_call, timer, rounds, warmup, benchmark, started=started)
    timed.warmup += sized
    peak = None
    if on_gpu and local:
        import torch
        peak = int(torch.cuda.max_memory_allocated(device))
    work = _gpu_work(full_call, device, local, notes) if gpu_work else None
    gpu_name = hardware.gpus[0].name if hardware is not None and hardware.gpus and on_gpu else None
    return LatencyResult(
        backend=info.backend, dtype=info.dtype, device=device, batch_size=batch.batch_size,
        prompt_len=batch.max_len, new_tokens=new_tokens, rounds=len(timed.e2e), warmup=timed.warmup,
        e2e=timed.e2e, prefill=timed.prefill, stop_reason=timed.stop_reason, timing_s=timed.seconds,
        weight_bytes=spec.weight_bytes(info.dtype) if spec is not None else 0,
        tp=info.tensor_parallel, gpu_name=gpu_name, bandwidth=memory_bandwidth(gpu_name),
        peak_gpu_memory_bytes=peak, gpu_work=work, notes=notes)


def _gpu_work(full_call, device: str, local: bool, notes: list[str]) -> GpuWork | None:
    """The GPU work of one full call, after the timed rounds; None with a note where it cannot be seen."""
    if not device.startswith("cuda"):
        notes.append("GPU work not measured: the engine runs on the CPU")
        return None
    if not local:
        notes.append("GPU work not measured: the engine runs in processes of its own (its ranks or a server)")
        return None
    try:
        return gpu_work_module.measure(full_call, device)
    except GpuWorkUnavailable as exc:
        notes.append(f"GPU work not measured: {exc}")
        return None

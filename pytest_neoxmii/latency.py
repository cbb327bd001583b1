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

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pytest_neoxmii.stats import summarize

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


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


# --- profiles -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LatencyProfile:
    prompt_len: int
    new_tokens: int
    rounds: int
    warmup: int                 # at least this many warm-up rounds ...
    min_warmup_s: float = 0.0   # ... and at least this long (GPU clocks ramp up from idle over seconds)


# GPU: the reference numbers' shape (64-token prompt, 32 new tokens) and enough rounds for the Mann-Whitney
# gate to see a 10-15% shift. CPU: the plumbing and the gate run, kept short (CI is CPU-only); 5 rounds is
# stats.MIN_SAMPLES, the fewest the gate compares.
GPU_PROFILE = LatencyProfile(prompt_len=64, new_tokens=32, rounds=20, warmup=3, min_warmup_s=3.0)
CPU_PROFILE = LatencyProfile(prompt_len=64, new_tokens=8, rounds=5, warmup=1)
BATCH_SIZES = (1, 4)


MAX_WARMUP_ROUNDS = 50


def warmup_rounds(min_rounds: int, min_seconds: float, round_s: float) -> int:
    """Warm-up rounds: at least min_rounds, and enough rounds of round_s seconds to last min_seconds."""
    if min_seconds <= 0 or round_s <= 0:
        return min_rounds
    return max(min_rounds, min(MAX_WARMUP_ROUNDS, math.ceil(min_seconds / round_s)))


def profile_for(device: str) -> LatencyProfile:
    return GPU_PROFILE if device.startswith("cuda") else CPU_PROFILE


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


def run_rounds(prefill_call: Callable[[], object], full_call: Callable[[], object], timer: Timer, rounds: int,
               warmup: int, benchmark=None) -> tuple[list[float], list[float]]:
    """`warmup` untimed-for-the-result rounds, then `rounds` rounds, each a prefill call then a full call.

    With pytest-benchmark's fixture the full call is the benchmarked target (pedantic mode, explicit warm-up)
    and the prefill call its per-round setup, so benchmark's own statistics are the end-to-end latency.
    Returns (prefill samples, end-to-end samples) of the measured rounds, paired."""
    prefill: list[float] = []
    e2e: list[float] = []

    def setup():
        prefill.append(timer.measure(prefill_call))

    def target():
        e2e.append(timer.measure(full_call))

    if benchmark is not None:
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    else:
        for _ in range(warmup + rounds):
            setup()
            target()
    # Warm-up rounds come first; anything after the measured rounds (pytest-benchmark's --benchmark-cprofile
    # runs the target again) is not a sample.
    return prefill[warmup:warmup + rounds], e2e[warmup:warmup + rounds]


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

    def __post_init__(self) -> None:
        from pytest_neoxmii.backends import ENGINES
        if self.backend in ENGINES and not ENGINES[self.backend].weights_on_gpu:
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
            "warmup_rounds": self.warmup,
            "e2e_p50_s": e2e["p50"], "e2e_p90_s": e2e["p90"], "e2e_p99_s": e2e["p99"],
            "e2e_mean_s": e2e["mean"], "e2e_stddev_s": e2e["stddev"],
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
        }
        if self.gate:
            out["gate_verdict"] = self.gate.get("verdict")
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
        parts = [f"{self.backend} {self.dtype} batch {self.batch_size}: end-to-end p50 {ms(self.e2e_s)}",
                 f"TTFT {ms(self.ttft_s)}", f"TPOT {ms(self.tpot_s)}"]
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        if self.ratio_to_hf is not None and self.backend != "hf":
            parts.append(f"{self.backend}/hf {self.ratio_to_hf:.2f}")
        pct = self.floor_pct
        parts.append(f"floor {ms(self.floor_s)} = {pct:.1f}% of TPOT" if pct is not None
                     else f"floor {self.floor_note}")
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


def measure_backend(backend, batch, new_tokens: int, rounds: int, warmup: int, *, spec=None, hardware=None,
                    benchmark=None, timer: Timer | None = None, min_warmup_s: float = 0.0) -> LatencyResult:
    """Time `rounds` rounds (after `warmup` rounds, more if they would last less than min_warmup_s) of
    prefill + full generation of one loaded backend."""
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
    if min_warmup_s > 0:
        # One untimed round sizes the warm-up; the warm-up itself still runs as pytest-benchmark's own
        # explicit warm-up rounds.
        first = timer.measure(prefill_call) + timer.measure(full_call)
        warmup = warmup_rounds(warmup, min_warmup_s - first, first)
    prefill, e2e = run_rounds(prefill_call, full_call, timer, rounds, warmup, benchmark)
    peak = None
    if on_gpu and local:
        import torch
        peak = int(torch.cuda.max_memory_allocated(device))
    gpu_name = hardware.gpus[0].name if hardware is not None and hardware.gpus and on_gpu else None
    return LatencyResult(
        backend=info.backend, dtype=info.dtype, device=device, batch_size=batch.batch_size,
        prompt_len=batch.max_len, new_tokens=new_tokens, rounds=rounds, warmup=warmup, e2e=e2e,
        prefill=prefill, weight_bytes=spec.weight_bytes(info.dtype) if spec is not None else 0,
        tp=info.tensor_parallel, gpu_name=gpu_name, bandwidth=memory_bandwidth(gpu_name),
        peak_gpu_memory_bytes=peak, notes=notes)

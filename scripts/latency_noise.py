"""Where the HF latency noise comes from (an open finding of issue 10): times the same greedy generation as the
suite's hf latency test (pythia-160m shape, synthetic weights, fp16, 64-token prompt, 32 new tokens, batch 1)
under conditions that differ in one thing each, interleaved in blocks so that a drift of the machine shows as
a drift, not as a condition's effect:

  plain      as the suite timed it before a43e30b (Python's cyclic GC on, the thread free to move between cores)
  gc-off     gc.disable() around the timed rounds (pytest-benchmark's --benchmark-disable-gc does this)
  pinned     the process pinned to one core (os.sched_setaffinity) for the rounds
  heap       plain, with a pytest-sized heap of live Python objects (a session's items, caches and reports)
  heap-gc-off  the same heap, GC off

Prints each condition's median, 95 % CI half-width of the median (samples.median_ci) and rounds, the round
series (to see steps) with what the machine did in each round (the CPU time the hypervisor stole from this
VM, from /proc/stat; the process's own CPU time; its involuntary context switches), and logs the SM clock with
nvidia-smi beside it.

  python3 scripts/latency_noise.py MODEL_DIR OUT_DIR [ROUNDS_PER_BLOCK] [BLOCKS]
"""
from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path



USAGE = "usage: python3 scripts/latency_noise.py MODEL_DIR OUT_DIR [ROUNDS_PER_BLOCK] [BLOCKS]"


def main() -> None:
    args = sys.argv[1:]
    if not 2 <= len(args) <= 4 or not all(a.isdigit() and int(a) > 0 for a in args[2:]) \
            or not (Path(args[0]) / "config.json").is_file():
        sys.exit(f"{USAGE} (MODEL_DIR: a model directory with config.json; counts: positive integers)")
    model_dir, out = Path(args[0]), Path(args[1])
    per_block = int(args[2]) if len(args) > 2 else 10
    blocks = int(args[3]) if len(args) > 3 else 3
    import torch                      # after the arguments are checked: a usage error costs no import

    from pytest_neoxmii.backends.hf import load_hf_model
    from pytest_neoxmii.samples import median_ci
    out.mkdir(parents=True, exist_ok=True)
    clocks = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu",
                               "--format=csv,noheader", "-lms", "100"], stdout=open(out / "clocks.csv", "w"))
    model = load_hf_model(model_dir, "fp16", "cuda:0")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50000, (1, 64), generator=gen).cuda()
    mask = torch.ones_like(ids)

    extra: dict[str, list] = {"steal_ms": [], "nivcsw": [], "cpu_ms": []}

    def steal_ms() -> float:
        # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal ... (clock ticks, all CPUs)
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")

    def one_round() -> float:
        s0, r0, c0 = steal_ms(), resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw, time.process_time()
        elapsed = _one_round()
        extra["steal_ms"].append(steal_ms() - s0)
        extra["nivcsw"].append(resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - r0)
        extra["cpu_ms"].append((time.process_time() - c0) * 1e3)
        return elapsed

    def _one_round() -> float:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, num_beams=1, pad_token_id=0)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    heap: list = []
    all_cpus = os.sched_getaffinity(0)

    def condition(name: str):
        heap.clear()
        if name.startswith("heap"):
            # about what a pytest session of the suite holds: items, reports, cached outputs as Python objects
            heap.extend({"k": i, "v": [i, str(i)]} for i in range(1_500_000))
        if name == "pinned":
            os.sched_setaffinity(0, {min(all_cpus)})
        else:
            os.sched_setaffinity(0, all_cpus)
        if name.endswith("gc-off"):
            gc.collect()
            gc.disable()
        else:
            gc.enable()

    for _ in range(5):       # warm-up, and the clocks up
        one_round()
    names = ["plain", "gc-off", "pinned", "heap", "heap-gc-off"]
    series: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    t0 = time.time()
    machine: dict[str, list] = {n: [] for n in names}
    for _block in range(blocks):
        for name in names:
            condition(name)
            one_round()      # one unmeasured round after the change
            for _ in range(per_block):
                series[name].append((time.time() - t0, one_round()))
                machine[name].append((round(extra["steal_ms"][-1], 1), extra["nivcsw"][-1],
                                      round(extra["cpu_ms"][-1], 1)))
        print(f"block {_block + 1}/{blocks} done at {time.time() - t0:.1f} s: "   # what a cut-short run keeps
              + ", ".join(f"{n} {statistics.median(x for _, x in series[n][-per_block:]) * 1e3:.0f} ms "
                          f"(steal {sum(m[0] for m in machine[n][-per_block:]):.0f} ms)" for n in names), flush=True)
    gc.enable()
    os.sched_setaffinity(0, all_cpus)
    clocks.terminate()
    summary = {}
    for name, rows in series.items():
        xs = [x for _, x in rows]
        ci = median_ci(xs)
        summary[name] = {"median_ms": statistics.median(xs) * 1e3, "min_ms": min(xs) * 1e3, "max_ms": max(xs) * 1e3,
                         "ci_half_width_pct": None if ci is None else ci.half_width_rel * 100, "rounds": len(xs),
                         "series_ms": [round(x * 1e3, 1) for _, x in rows],
                         "at_s": [round(t, 2) for t, _ in rows]}
        print(f"{name:12} median {summary[name]['median_ms']:7.1f} ms  +-{summary[name]['ci_half_width_pct'] or 0:5.1f}%  "
              f"min {summary[name]['min_ms']:7.1f}  max {summary[name]['max_ms']:7.1f}  n={len(xs)}")
        print("   ", " ".join(f"{v:.0f}" for v in summary[name]["series_ms"]))
        summary[name]["steal_ms_nivcsw_cpu_ms"] = machine[name]
        print("    steal ms", " ".join(f"{m[0]:.0f}" for m in machine[name]))
        print("    cpu ms  ", " ".join(f"{m[2]:.0f}" for m in machine[name]))
        print("    nivcsw  ", " ".join(f"{m[1]}" for m in machine[name]))
    (out / "noise.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "cpus": len(all_cpus),
                                                "torch": torch.__version__, "conditions": summary}, indent=1))


if __name__ == "__main__":
    main()

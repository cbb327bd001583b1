"""What ran on this machine's CPUs, thread by thread, while a session timed something (docs/SPEED.md, the
fourteenth round): every 50 ms, the CPU time each thread of every process used since the last sample
(/proc/PID/task/TID/schedstat), and the time the hypervisor stole from the machine (/proc/stat). Linux only.

    python scripts/cpu_sampler.py OUT.jsonl [--seconds S] [--interval 0.05] &
    pytest ... ; kill %1

Writes JSON lines: {"pid", "cmd"} the first time a process is seen using CPU, then one line per sample,
{"t": wall-clock seconds, "steal_ticks": ..., "threads": [[pid, tid, comm, CPU ms], ...]}, listing the threads
that used more than 2 ms since the previous sample. Set against the wall-clock start of each timed round, it says
whether anything else (another process of the session, one of its threads, the VM's own agents) was on the CPU
during a slow round. The figures come in the kernel's accounting steps (4 ms on the lent GPU machines)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

MIN_MS = 2.0      # a thread that used less since the last sample is left out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/cpu_sampler.py")
    p.add_argument("out", help="the JSON-lines file to write")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until killed)")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between samples (default 0.05)")
    return p.parse_args(argv)


def thread_cpu_ns() -> dict[tuple[int, int], int]:
    """{(pid, tid): nanoseconds on a CPU so far} of every thread this process may read."""
    times = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:                      # ended meanwhile
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    times[(int(pid), int(tid))] = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return times


def _read(path: str, default: str = "?") -> str:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return default


def steal_ticks() -> int:
    """The CPU time stolen from this machine so far (/proc/stat's `steal`, in clock ticks)."""
    fields = _read("/proc/stat", "cpu 0 0 0 0 0 0 0 0").splitlines()[0].split()
    return int(fields[8]) if len(fields) > 8 else 0


def _error(message: str) -> int:
    print(f"cpu_sampler: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isdir("/proc/self/task"):
        return _error("needs Linux's /proc (per-thread schedstat)")
    if not args.interval > 0 or (args.seconds is not None and not args.seconds > 0):
        return _error(f"--interval and --seconds are seconds above 0, got {args.interval} and {args.seconds}")
    try:
        out = open(args.out, "w", buffering=1)
    except OSError as exc:
        return _error(f"cannot write {args.out}: {exc.strerror}")
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    last, seen = thread_cpu_ns(), set()
    stolen = steal_ticks()
    with out:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(args.interval)
            now, times, steal = time.time(), thread_cpu_ns(), steal_ticks()
            ran = []
            for (pid, tid), ns in times.items():
                ms = (ns - last.get((pid, tid), ns)) / 1e6
                if ms > MIN_MS:
                    if pid not in seen:
                        seen.add(pid)
                        out.write(json.dumps({"pid": pid, "cmd": _read(f"/proc/{pid}/cmdline")[:200]}) + "\n")
                    ran.append([pid, tid, _read(f"/proc/{pid}/task/{tid}/comm"), round(ms, 1)])
            out.write(json.dumps({"t": round(now, 3), "steal_ticks": steal - stolen, "threads": ran}) + "\n")
            last, stolen = times, steal
    return 0


if __name__ == "__main__":
    sys.exit(main())

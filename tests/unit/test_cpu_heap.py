"""deploy/cpu_heap.py: a process running models on the CPU keeps freed memory for its next call, instead of
asking the kernel for fresh pages at every large tensor. Measured in a child process, by its page faults:
the test process's own allocator is left as it is."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import textwrap

import pytest

from pytest_neoxmii.deploy import cpu_heap

glibc_only = pytest.mark.skipif(cpu_heap._mallopt() is None, reason="needs glibc's mallopt (Linux with glibc); "
                                f"this is {sys.platform} without it")

# What a CPU session's judge does at every chunk of a long case: a float64 log-softmax over a 50k vocabulary
# and a few float32 temporaries, made and freed. Thirteen rounds with glibc's default, then thirteen with
# `device`'s setting: each round's page faults, the first three left out (the heap grows to what the rounds
# need there).
_ROUNDS = textwrap.dedent("""
    import resource, sys, torch
    from pytest_neoxmii.deploy import cpu_heap
    x = torch.randn(160, 50304)
    def chunk():
        torch.log_softmax(x, -1, dtype=torch.float64).exp_().sum()
        (x * 2).argmax(-1)
    def faults():
        per_round = []
        for _ in range(13):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            chunk()
            per_round.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return per_round[3:]
    default = faults()
    kept = cpu_heap.keep_freed_memory(sys.argv[1])
    print(kept, ",".join(map(str, default)), ",".join(map(str, faults())))
""")


def _rounds(device: str) -> tuple[bool, list[int], list[int]]:
    """(whether the process keeps freed memory, each round's faults with glibc's default, each one's after)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _ROUNDS, device], capture_output=True, text=True, timeout=120,
                         env=environment, check=True).stdout.split()
    return out[0] == "True", [int(n) for n in out[1].split(",")], [int(n) for n in out[2].split(",")]


@glibc_only
def test_a_cpu_process_reuses_freed_memory_where_the_default_asks_the_kernel_for_fresh_pages_each_time():
    kept, faults_default, faults_kept = _rounds("cpu")
    assert kept
    # Each round makes 64 MB float64 and 32 MB float32 blocks: about 24,000 pages of 4 KiB. The default faults
    # most of them in again at every round.
    typical_default, typical_kept = statistics.median(faults_default), statistics.median(faults_kept)
    assert typical_default > 12_000, f"default allocator: only {faults_default} page faults in its rounds"
    # Kept: a typical round faults nothing. The median, not the sum: in some address layouts glibc grows the
    # heap by one more block in a later round, then reuses it like the rest (a sum over rounds 9-13 counted
    # it in 9 of 41 runs in the unit suite's environment: docs/SPEED.md, the twenty-third round).
    assert typical_kept < typical_default / 20, (f"page faults per round with freed memory kept: {faults_kept}; "
                                                f"with glibc's default: {faults_default}")


@pytest.mark.parametrize("variable,value", [("MALLOC_MMAP_MAX_", "65536"),
                                            ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")])
def test_a_user_who_tunes_glibc_malloc_keeps_their_own_settings(variable, value, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_heap, "_kept", False)    # (an in-process session of this run may have set it)
    monkeypatch.setattr(cpu_heap, "_mallopt", lambda: lambda param, v: calls.append((param, v)) or 1)
    assert not cpu_heap.keep_freed_memory("cpu", {variable: value})
    assert calls == []
    assert not cpu_heap.should_keep_freed_memory("cpu", {variable: value})
    assert cpu_heap.describe("cpu", {variable: value}) is None
    assert cpu_heap.should_keep_freed_memory("cpu", {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})


def test_only_cpu_processes_and_the_header_says_so_only_there():
    assert not cpu_heap.should_keep_freed_memory("cuda:0", {})
    assert cpu_heap.describe("cuda:0") is None
    if cpu_heap._mallopt() is not None:
        assert "freed blocks kept for reuse" in cpu_heap.describe("cpu", {})


@pytest.mark.parametrize("device,asked", [("cpu", [(-4, 0), (-1, -1)]), ("cuda:0", [])])
def test_a_worker_sets_the_allocator_before_it_loads_its_engine_and_only_on_the_cpu(device, asked, monkeypatch):
    """worker.load: a CPU worker's engine already loads with freed memory kept (mallopt: no mmap, no trim);
    a GPU worker leaves glibc as it is. mallopt is a recorder here: this process's allocator is not touched."""
    from pytest_neoxmii import worker
    from pytest_neoxmii.backends.base import LoadRequest
    from pytest_neoxmii.errors import BackendUnavailable
    calls = []
    monkeypatch.setattr(cpu_heap, "_kept", False)
    monkeypatch.setattr(cpu_heap, "_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    for variable in [v for v in os.environ if v.startswith("MALLOC_") or v == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(variable)

    class Probe:
        runs_in_worker = False
        injects_kernels = False

        @classmethod
        def load(cls, request):
            raise BackendUnavailable(f"kept during the load: {cpu_heap._kept}, mallopt asked {calls}")
    _, message = worker.load(Probe, LoadRequest(path="unused", dtype="fp32", device=device))
    assert message["message"] == f"kept during the load: {bool(asked)}, mallopt asked {asked}"


# A model released so that another fits the host (the HF models taking turns in a small container): its kept
# pages go back to the kernel. 400 MB in blocks of 40 MB, freed, then the heap's free pages given back.
_RELEASE = textwrap.dedent("""
    import sys, torch
    from pytest_neoxmii.deploy import cpu_heap
    def anon_mb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    before_keeping = cpu_heap.give_back_freed_memory()
    cpu_heap.keep_freed_memory("cpu")
    blocks = [torch.ones(10 * 2**20) for _ in range(10)]
    held = anon_mb()
    del blocks
    kept = anon_mb()
    gave = cpu_heap.give_back_freed_memory()
    print(before_keeping, held, kept, gave, anon_mb())
""")


@glibc_only
def test_a_released_models_kept_pages_go_back_to_the_kernel_when_asked():
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, timeout=120,
                         env=environment, check=True).stdout.split()
    before_keeping, held, kept, gave, after = out[0] == "True", *map(int, out[1:3]), out[3] == "True", int(out[4])
    assert not before_keeping                 # nothing kept, nothing to give: glibc's default already trims
    assert kept > held - 50, (held, kept)     # freed, but kept in the heap
    assert gave and after < kept - 350, (held, kept, after)

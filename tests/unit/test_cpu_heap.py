"""deploy/cpu_heap.py: a process running models on the CPU keeps freed memory for its next call, instead of
asking the kernel for fresh pages at every large tensor. Measured in a child process, by its page faults:
the test process's own allocator is left as it is."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pytest_neoxmii.deploy import cpu_heap

glibc_only = pytest.mark.skipif(cpu_heap._mallopt() is None, reason="needs glibc's mallopt (Linux with glibc); "
                                f"this is {sys.platform} without it")

# What a CPU session's judge does at every chunk of a long case: a float64 log-softmax over a 50k vocabulary
# and a few float32 temporaries, made and freed. Five rounds with glibc's default, then five with `device`'s
# setting, each after eight rounds that let the heap grow to what the rounds need: page faults of each five.
_ROUNDS = textwrap.dedent("""
    import resource, sys, torch
    from pytest_neoxmii.deploy import cpu_heap
    x = torch.randn(160, 50304)
    def chunk():
        torch.log_softmax(x, -1, dtype=torch.float64).exp_().sum()
        (x * 2).argmax(-1)
    def faults():
        for _ in range(8):
            chunk()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            chunk()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    default = faults()
    kept = cpu_heap.keep_freed_memory(sys.argv[1])
    print(kept, default, faults())
""")


def _rounds(device: str) -> tuple[bool, int, int]:
    """(whether the process keeps freed memory, faults with glibc's default, faults after)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _ROUNDS, device], capture_output=True, text=True, timeout=120,
                         env=environment, check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@glibc_only
def test_a_cpu_process_reuses_freed_memory_where_the_default_asks_the_kernel_for_fresh_pages_each_time():
    kept, faults_default, faults_kept = _rounds("cpu")
    assert kept
    # 5 x (64 MB float64 + 32 MB float32) is about 120,000 pages of 4 KiB: the default faults them in again.
    assert faults_default > 60_000, f"default allocator: only {faults_default} page faults in 5 chunks"
    # Kept: none once the heap has grown to what the rounds need (in the first rounds, freed blocks a little
    # too small for posix_memalign's slack make it grow to a few times the working set, then it stays).
    assert faults_kept < faults_default / 20, (f"{faults_kept} page faults with freed memory kept, "
                                              f"{faults_default} without")


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

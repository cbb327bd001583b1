"""deploy/cpu_heap.py: a process running models on the CPU keeps freed memory for its next call, instead of
asking the kernel for fresh pages at every large tensor. Measured in child processes, by their page faults:
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

# Ten rounds of what a CPU session's judge does at every chunk of a long case: a float64 log-softmax over a
# 50k vocabulary and a few float32 temporaries, made and freed.
_ROUNDS = textwrap.dedent("""
    import resource, sys, torch
    from pytest_neoxmii.deploy import cpu_heap
    kept = cpu_heap.keep_freed_memory(sys.argv[1])
    x = torch.randn(256, 50304)
    def chunk():
        torch.log_softmax(x, -1, dtype=torch.float64).exp_().sum()
        (x * 2).argmax(-1)
    for _ in range(10):                               # the heap grows to the size the rounds need
        chunk()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        chunk()
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _rounds(device: str, **env) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _ROUNDS, device], capture_output=True, text=True, timeout=120,
                         env={**environment, **env}, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_a_cpu_process_reuses_freed_memory_where_the_default_asks_the_kernel_for_fresh_pages_each_time():
    kept, faults_kept = _rounds("cpu")
    default, faults_default = _rounds("cuda:0")        # a CUDA session's process keeps glibc's default
    assert kept and not default
    # 10 x (103 MB float64 + 51 MB float32) is about 380,000 pages of 4 KiB: the default faults them in again.
    assert faults_default > 200_000, f"default allocator: only {faults_default} page faults in 10 chunks"
    # Kept: none once the heap has grown to what the rounds need (in the first rounds, freed blocks a little
    # too small for posix_memalign's slack make it grow to a few times the working set, then it stays).
    assert faults_kept < faults_default / 20, (f"{faults_kept} page faults with freed memory kept, "
                                              f"{faults_default} without")


@glibc_only
@pytest.mark.parametrize("variable,value", [("MALLOC_MMAP_MAX_", "65536"),
                                            ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")])
def test_a_user_who_tunes_glibc_malloc_keeps_their_own_settings(variable, value):
    kept, faults = _rounds("cpu", **{variable: value})
    assert not kept
    assert not cpu_heap.keeps_freed_memory("cpu", {variable: value})
    assert cpu_heap.keeps_freed_memory("cpu", {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})


def test_only_cpu_processes_and_the_header_says_so_only_there():
    assert not cpu_heap.keeps_freed_memory("cuda:0", {})
    assert cpu_heap.describe("cuda:0") is None
    if cpu_heap._mallopt() is not None and not cpu_heap._user_tunes_malloc(os.environ):
        assert "freed blocks kept for reuse" in cpu_heap.describe("cpu")


@glibc_only
def test_a_worker_on_the_cpu_keeps_freed_memory_before_it_loads_its_engine(tmp_path):
    """worker.load: the engine's load already runs with freed memory kept (the CPU worker's own calls)."""
    script = textwrap.dedent("""
        import sys
        from pytest_neoxmii import worker
        from pytest_neoxmii.backends.base import LoadRequest
        from pytest_neoxmii.deploy import cpu_heap
        from pytest_neoxmii.errors import BackendUnavailable
        class Probe:
            runs_in_worker = False
            injects_kernels = False
            @classmethod
            def load(cls, request):
                raise BackendUnavailable(f"kept during the load: {cpu_heap._kept}")
        backend, message = worker.load(Probe, LoadRequest(path=sys.argv[1], dtype="fp32", device=sys.argv[2]))
        print(message["message"])
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    said = {device: subprocess.run([sys.executable, "-c", script, str(tmp_path), device], capture_output=True,
                                   text=True, timeout=120, env=env).stdout for device in ("cpu", "cuda:0")}
    assert "kept during the load: True" in said["cpu"], said
    assert "kept during the load: False" in said["cuda:0"], said

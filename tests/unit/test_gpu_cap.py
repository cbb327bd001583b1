"""--neox-gpu-memory-cap: the size is parsed with its unit (a bad one is a one-line usage error), the header
says the cap, what fits is judged against the cap for worker engines (not for the reference in the test
process), and a worker applies it to torch's allocator and checks its whole process after the load."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from pytest_neoxmii.deploy import gpu_cap
from pytest_neoxmii.errors import NeoxUsageError
from pytest_neoxmii.options import parse_size


@pytest.mark.parametrize("text, size", [("40GiB", 40 * 2**30), ("42.3GB", 42_300_000_000), ("40960 MiB", 40 * 2**30),
                                        ("500mb", 500_000_000)])
def test_sizes_are_read_with_their_unit(text, size):
    assert parse_size(text, "--neox-gpu-memory-cap") == size


@pytest.mark.parametrize("text", ["40", "forty GB", "40TB", "0GB", "-4GB", ""])
def test_a_size_without_a_known_unit_is_a_usage_error_naming_the_flag(text):
    with pytest.raises(NeoxUsageError, match=r"^--neox-gpu-memory-cap (is a size with a unit such as 40GiB|must be "
                                             r"above 0)"):
        parse_size(text, "--neox-gpu-memory-cap")


def test_a_bad_cap_on_the_command_line_is_one_line(pytester):
    result = pytester.runpytest("--neox-gpu-memory-cap=40")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --neox-gpu-memory-cap is a size with a unit such as 40GiB*got '40'"])
    assert "Traceback" not in result.stderr.str()


# The session is reached directly: the `neox` fixture would build the weights (12b synthetic: minutes on CPU),
# and what fits is decided from the shape alone.
FITS_TESTS = """
from pytest_neoxmii.plugin import get_session

def test_ds(request):
    get_session(request.config).backend("ds")

def test_reference(request):
    get_session(request.config).reference()
"""


def _fits_session(pytester, monkeypatch) -> list[str]:
    """FITS_TESTS with loads stubbed (each records its engine and skips) and no weights built: what was loaded."""
    from pytest_neoxmii import session as session_module
    loaded = []
    monkeypatch.setattr(session_module, "load_backend", lambda name, request, **kw: loaded.append(name) or pytest.skip("stub"))
    monkeypatch.setattr(session_module.NeoxSession, "require_model", lambda self: self.model)   # no weights built
    monkeypatch.delenv(gpu_cap.ENV, raising=False)
    pytester.makepyfile(test_fits=FITS_TESTS)
    return loaded


def test_what_fits_is_judged_against_the_cap_for_workers_only(pytester, fake_gpus, tmp_path, monkeypatch):
    """pythia-12b fp16 (about 24 GB of weights x 1.2 headroom) fits an 80 GB H100 but not a 20 GiB cap; the
    fp32 reference in the test process (about 47 GB x 1.2) is judged against the card, so it goes on to load
    (stubbed here: the stub records the call and skips)."""
    fake_gpus("h100")
    loaded = _fits_session(pytester, monkeypatch)
    result = pytester.runpytest("--neox-model=pythia-12b", "--neox-weights=synthetic", "--neox-backends=ds",
                                f"--neox-cache-dir={tmp_path / 'cache'}", "--neox-gpu-memory-cap=20GiB",
                                "-p", "no:cacheprovider", "-rs")
    text = result.stdout.str()
    assert "neoxmii: GPU memory cap 20.00 GiB per worker and GPU (--neox-gpu-memory-cap)" in text
    skipped = [ln for ln in result.outlines if ln.startswith("SKIPPED")]
    assert any("test_fits.py:3" in ln and "(GPU memory capped at 20.00 GiB per worker by --neox-gpu-memory-cap)"
               in ln for ln in skipped), text
    assert loaded == ["hf"]                       # the reference was not held to the cap
    assert gpu_cap.ENV not in os.environ      # the session's setting ended with it


SHARED_H100_SMI = """#!/bin/sh
# GPU-fake-0 (an 80 GB H100) on which another job's process (pid 4242) holds 70000 MiB
case "$1" in
  --query-gpu=*) echo "0, GPU-fake-0, 70000" ;;
  --query-compute-apps=*) echo "GPU-fake-0, 4242, 70000" ;;
esac
"""


def test_what_fits_counts_only_the_memory_other_processes_left(pytester, fake_gpus, tmp_path, monkeypatch):
    """On a GPU shared with another job, the fits count the card's memory less what other processes held when
    the session started: pythia-12b fp16 (about 24 GB x 1.2) fits an 80 GB H100, but not the 12 GB another
    job's 70000 MiB leave. The skip says both figures; the header and the JSON summary say what was in use."""
    fake_gpus("h100", uuids=True)
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(SHARED_H100_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    loaded = _fits_session(pytester, monkeypatch)
    result = pytester.runpytest("--neox-model=pythia-12b", "--neox-weights=synthetic", "--neox-backends=ds",
                                f"--neox-cache-dir={tmp_path / 'cache'}", f"--neox-report={tmp_path / 'rep'}",
                                "-p", "no:cacheprovider", "-rs")
    text = result.stdout.str()
    in_use = "GPU 0: 73.4 GB of its 85.0 GB held by other processes when the session started"
    assert f"neoxmii: GPU memory in use: {in_use}; every fit counts only the rest" in text
    skipped = [ln for ln in result.outlines if ln.startswith("SKIPPED")]
    assert any("test_fits.py:3" in ln and "found 1 GPU with 11.6 GB" in ln and f"({in_use})" in ln
               for ln in skipped), text
    assert any("test_fits.py:6" in ln and f"({in_use})" in ln for ln in skipped), text
    assert loaded == []                           # neither loaded into the memory another job holds
    summary = json.loads((tmp_path / "rep" / "neoxmii-summary.json").read_text())
    assert summary["hardware"]["memory_in_use_by_others_at_start_bytes"] == {"0": 70000 * 2**20}


def test_a_worker_applies_the_cap_and_names_the_excess(monkeypatch):
    monkeypatch.setenv(gpu_cap.ENV, str(40 * 2**30))
    assert gpu_cap.cap_bytes() == 40 * 2**30
    assert gpu_cap.exceeded("cpu") is None and gpu_cap.describe_oom("cpu") is None     # no GPU, no cap
    monkeypatch.setattr(gpu_cap, "process_used_bytes", lambda index: (int(41.5 * 2**30), "nvidia-smi, this process"))
    assert gpu_cap.exceeded("cuda:1", "rank 1") == (
        "rank 1 holds 41.50 GiB of cuda:1 after loading (nvidia-smi, this process), over the "
        "--neox-gpu-memory-cap of 40.00 GiB")
    monkeypatch.setattr(gpu_cap, "process_used_bytes", lambda index: (39 * 2**30, "nvidia-smi, this process"))
    assert gpu_cap.exceeded("cuda:0") is None
    assert gpu_cap.describe_oom("cuda:0") == "ran out of the --neox-gpu-memory-cap of 40.00 GiB on cuda:0"
    monkeypatch.setenv(gpu_cap.ENV, "lots")
    assert gpu_cap.cap_bytes() is None


def test_a_load_out_of_gpu_memory_is_one_line_with_what_was_free():
    """DeepSpeed's inference workspace checks the free memory itself, or fails to create its cuBLAS handle, each a
    RuntimeError (MII's load on one H200 shared with another job, as a 40-line traceback in every test of the
    engine); torch's allocator raises
    OutOfMemoryError. Either is one line with what the GPU had free after it, or the cap where one applies;
    any other error, or a load on the CPU, is left to the traceback."""
    workspace = RuntimeError("Workspace can't be allocated, not enough memory")
    line = gpu_cap.out_of_memory(workspace, "cuda:0", free_and_total=(int(1.25 * 2**30), int(139.8 * 2**30)))
    assert line.startswith("ran out of GPU memory while loading (RuntimeError: Workspace can't be allocated, not "
                           "enough memory); cuda:0 had 1.25 GiB free of 139.80 GiB after it. ")
    assert "\n" not in line and "GPU memory in use" in line

    class OutOfMemoryError(RuntimeError):
        pass
    assert "(OutOfMemoryError: CUDA out of memory. Tried" in gpu_cap.out_of_memory(
        OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), "cuda:1", free_and_total=(0, 1))
    cublas = RuntimeError("Failed to create cublas handle: cublasStatus_t was 3")
    assert "(RuntimeError: Failed to create cublas handle: cublasStatus_t was 3); cuda:0 had 0.00 GiB free" in \
        gpu_cap.out_of_memory(cublas, "cuda:0", free_and_total=(0, 1))
    assert gpu_cap.out_of_memory(RuntimeError("cublasStatus_t was 13"), "cuda:0", free_and_total=(0, 1)) is None
    assert gpu_cap.out_of_memory(workspace, "cpu") is None
    assert gpu_cap.out_of_memory(ValueError("bad config"), "cuda:0", free_and_total=(0, 1)) is None
    unreadable = gpu_cap.out_of_memory(workspace, "cuda:0", free_and_total=("?",))
    assert "(RuntimeError: Workspace can't be allocated, not enough memory); cuda:0's free memory could not be " \
           "read." in unreadable


def test_a_load_out_of_gpu_memory_under_the_cap_names_the_cap(monkeypatch):
    monkeypatch.setenv(gpu_cap.ENV, str(40 * 2**30))
    line = gpu_cap.out_of_memory(RuntimeError("Workspace can't be allocated, not enough memory"), "cuda:0")
    assert line == ("ran out of the --neox-gpu-memory-cap of 40.00 GiB on cuda:0: RuntimeError: Workspace can't be "
                    "allocated, not enough memory")


def test_what_a_worker_holds_is_read_from_its_own_gpu_by_uuid(monkeypatch):
    """A worker started with CUDA_VISIBLE_DEVICES=1 sees that GPU as cuda:0, and nvidia-smi calls it GPU 1:
    matched by index, its figure was read from GPU 0, where it holds nothing, and the cap was judged by torch's
    reserved memory alone, without the CUDA context and DeepSpeed's workspace."""
    import torch

    from pytest_neoxmii.deploy import gpumem
    me = str(os.getpid())
    smi = {"gpu": [["0", "GPU-other", "1000"], ["1", "GPU-mine", "3000"]],
           "compute-apps": [["GPU-other", "4242", "1000"], ["GPU-mine", me, "2048"]]}
    monkeypatch.setattr(gpumem, "_smi", lambda query, kind="gpu": smi[kind])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid="mine"))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 5)
    assert gpu_cap.process_used_bytes(0) == (2048 * 2**20, "nvidia-smi, this process")
    smi["compute-apps"].pop()                    # not listed (another PID namespace): torch's figure, said so
    assert gpu_cap.process_used_bytes(0) == (5, "torch's reserved memory (without the CUDA context)")

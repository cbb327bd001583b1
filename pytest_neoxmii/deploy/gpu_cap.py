"""The per-worker GPU memory cap (--neox-gpu-memory-cap): what each worker process may use of each GPU, so
that a configuration meant for smaller cards (gpt-neox-20b at tp=2 on two 40 GB A100s) is proven on bigger
ones. The session puts the cap in the environment every worker inherits; each worker applies it to torch's
allocator before it loads anything, and checks after the load what the whole process holds on its GPU
(DeepSpeed's inference workspace and the CUDA context are cudaMalloc'ed outside torch's allocator, so the
allocator's limit alone would not be the truth)."""
from __future__ import annotations

import os

ENV = "NEOXMII_GPU_MEMORY_CAP"       # bytes


def cap_bytes() -> int | None:
    value = os.environ.get(ENV)
    if not value:
        return None
    try:
        cap = int(value)
    except ValueError:
        return None
    return cap if cap > 0 else None


def _index(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    _, _, index = device.partition(":")
    return int(index.split(",")[0]) if index else 0


def apply(device: str) -> None:
    """Limit torch's allocator in this process to the cap on `device` (an allocation past it raises
    torch.OutOfMemoryError, which the worker reports with the cap)."""
    cap, index = cap_bytes(), _index(device)
    if cap is None or index is None:
        return
    import torch
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)


def process_used_bytes(index: int) -> tuple[int | None, str]:
    """What this process holds on GPU `index`, and how it was read: nvidia-smi's per-process figure (the
    CUDA context and every cudaMalloc included), else torch's reserved memory plus nothing it cannot see."""
    import torch

    from pytest_neoxmii import hardware
    from pytest_neoxmii.deploy import gpumem
    # torch numbers the GPUs CUDA_VISIBLE_DEVICES shows, nvidia-smi every GPU: the uuid names the same one
    uuid = hardware.smi_uuid(getattr(torch.cuda.get_device_properties(index), "uuid", None))
    used = gpumem.process_used_bytes(uuid=uuid) if uuid else None
    if used is not None:
        return used, "nvidia-smi, this process"
    return int(torch.cuda.memory_reserved(index)), "torch's reserved memory (without the CUDA context)"


def exceeded(device: str, what: str = "the worker") -> str | None:
    """Why the process is over the cap on `device` after its load, or None (no cap, no GPU, or within it)."""
    cap, index = cap_bytes(), _index(device)
    if cap is None or index is None:
        return None
    used, how = process_used_bytes(index)
    if used is None or used <= cap:
        return None
    return (f"{what} holds {used / 2**30:.2f} GiB of cuda:{index} after loading ({how}), over the "
            f"--neox-gpu-memory-cap of {cap / 2**30:.2f} GiB")


# What running out of GPU memory during a load looks like: torch's allocator, and DeepSpeed's inference
# workspace, which checks cudaMemGetInfo itself, or fails to create its cuBLAS handle (status 3,
# CUBLAS_STATUS_ALLOC_FAILED), each a RuntimeError. Both seen in MII's load on one H200 shared with another job,
# as a 40-line traceback in every test of the engine.
OUT_OF_MEMORY_SIGNS = ("OutOfMemoryError", "out of memory", "Workspace can't be allocated", "cublasStatus_t was 3",
                       "CUBLAS_STATUS_ALLOC_FAILED")


def out_of_memory(exc: BaseException, device: str, free_and_total=None) -> str | None:
    """One line for a load that ran out of GPU memory on `device`: the error's first line and what the GPU had
    free after it (its failed allocations given back), or the cap where one applies; None for any other error
    or off the GPU."""
    index = _index(device)
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if index is None or not any(sign in text for sign in OUT_OF_MEMORY_SIGNS):
        return None
    capped = describe_oom(device)
    if capped:
        return f"{capped}: {text}"
    try:
        if free_and_total is None:
            import torch
            free_and_total = torch.cuda.mem_get_info(index)
        free, total = free_and_total
        found = f"cuda:{index} had {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB after it"
    except Exception:           # the error was still memory; only the figure is missing
        found = f"cuda:{index}'s free memory could not be read"
    return (f"ran out of GPU memory while loading ({text}); {found}. Other processes on the GPU (another job, "
            f"this session's other engines) hold the rest: the header's 'GPU memory in use' line says what was "
            f"held when the session started")


def describe_oom(device: str) -> str | None:
    """The cap in words, for an out-of-memory error while it applies."""
    cap, index = cap_bytes(), _index(device)
    if cap is None or index is None:
        return None
    return f"ran out of the --neox-gpu-memory-cap of {cap / 2**30:.2f} GiB on cuda:{index}"

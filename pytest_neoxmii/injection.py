"""Kernel injection must be verified, not assumed: with some transformers versions DeepSpeed's policy
never matches and init_inference returns without error having replaced nothing (its outputs then equal
HF's, and a parity test would pass for the wrong reason)."""
from __future__ import annotations

from dataclasses import dataclass

from pytest_neoxmii.errors import BackendUnavailable


class InjectionFailed(AssertionError):
    """Kernels were asked for and not (all) injected."""


@dataclass(frozen=True)
class InjectionReport:
    injected: int
    total: int

    def describe(self) -> str:
        return f"injected {self.injected}/{self.total} layers"


def count_injected(module, total_layers: int) -> InjectionReport:
    try:
        from deepspeed.model_implementations.transformers.ds_transformer import DeepSpeedTransformerInference
    except ImportError as exc:
        raise BackendUnavailable(f"deepspeed is not importable: {exc}") from None
    injected = sum(isinstance(m, DeepSpeedTransformerInference) for m in module.modules())
    return InjectionReport(injected=injected, total=total_layers)


def require_injected(report: InjectionReport, transformers_version: str | None) -> None:
    if report.injected == report.total and report.total > 0:
        return
    raise InjectionFailed(
        f"kernel injection was requested but DeepSpeed {report.describe()} "
        f"(transformers {transformers_version}): its GPT-NeoX policy did not match these layers, so the "
        "model would run unoptimised HF code and parity would pass for the wrong reason")


def held_since(device: str, before: int | None) -> tuple[int | None, str]:
    """GPU memory this process took since `before` (a gpu_used_bytes reading), and how it was measured:
    its own figure from nvidia-smi (CUDA context included) where the driver attributes memory to
    processes, else the device-wide difference, which counts whatever else loaded meanwhile."""
    if not device.startswith("cuda"):
        return None, ""
    import torch
    from pytest_neoxmii.deploy.gpumem import process_used_bytes
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()        # as gpu_used_bytes: the allocator's idle cache is not the model's
    own = process_used_bytes()
    if own is not None:
        return own, "GPU memory of the process (nvidia-smi)"
    return gpu_used_bytes(device) - before, "GPU memory device-wide, other loads meanwhile included"


def gpu_used_bytes(device: str) -> int | None:
    """Device-wide memory in use (torch's allocator does not see DeepSpeed's workspace)."""
    import torch
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return total - free

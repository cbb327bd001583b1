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


# DeepSpeed's inference workspace (activations and the KV cache of every injected layer) is one process-wide
# buffer, cudaMalloc'ed outside torch's allocator and shared by every injected model in the process. It is
# released when the last injected engine of this process closes, so teardown gives all its memory back.
_live_engines = 0


def engine_loaded() -> None:
    global _live_engines
    _live_engines += 1


def engine_closed() -> None:
    global _live_engines
    _live_engines = max(_live_engines - 1, 0)
    if _live_engines:
        return
    try:
        from deepspeed.model_implementations.transformers.ds_transformer import DeepSpeedTransformerInference
    except ImportError:
        return
    workspace = DeepSpeedTransformerInference.workspace
    if workspace is not None:
        workspace.release_workspace()
        DeepSpeedTransformerInference.workspace = None


def gpu_used_bytes(device: str) -> int | None:
    """Device-wide memory in use (torch's allocator does not see DeepSpeed's workspace)."""
    import torch
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return total - free

"""DeepSpeed inference (`deepspeed.init_inference`): the whole model on the GPU(s), kernel injection on
CUDA (verified), tensor parallel across GPUs. On a CPU-only machine it runs without injection, so the
plumbing is still exercised, and the report says so."""
from __future__ import annotations

from pathlib import Path

import torch

from pytest_neoxmii import compat
from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.backends.hf import load_hf_model
from pytest_neoxmii.backends.torch_model import TorchModelBackend
from pytest_neoxmii.dtypes import TORCH_DTYPES
from pytest_neoxmii.errors import BackendUnavailable
from pytest_neoxmii.injection import (count_injected, engine_closed, engine_loaded, gpu_used_bytes,
                                      require_injected)


def check_kernel_dtype(dtype: str, device: str) -> None:
    """The dtypes DeepSpeed's GPT-NeoX inference kernels run: fp16 everywhere, bf16 from compute
    capability 8.0 (Ampere). fp32 injection is not offered by this tool: it is not what users deploy."""
    if dtype == "fp32":
        raise BackendUnavailable("DeepSpeed kernel injection runs fp16 or bf16 here, not fp32: "
                                 "use --neox-dtype=fp16 or bf16 (the fp32 HF reference is always run)")
    if dtype == "bf16" and device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise BackendUnavailable(f"bf16 kernels need compute capability 8.0 or newer, found "
                                     f"{major}.{minor} on {torch.cuda.get_device_name(device)}")


def check_kernels_can_run(dtype: str, device: str) -> None:
    """Everything that rules kernel injection out before a model is loaded (CUDA only)."""
    if not device.startswith("cuda"):
        return
    reason = compat.check_kernel_injection()
    if reason:
        raise BackendUnavailable(reason)
    check_kernel_dtype(dtype, device)


def init_distributed_env() -> None:
    """A single-process torch.distributed world (DeepSpeed wants one even for tp=1 / ZeRO on one GPU,
    else it looks for mpi4py)."""
    import os
    import socket
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)


class DeepSpeedBackend(TorchModelBackend):
    def __init__(self, path: Path, dtype: str, device: str, tp: int, max_tokens: int, max_batch: int = 1, *,
                 engine_config: dict | None = None):
        from pytest_neoxmii.serving_config import merged
        on_gpu = device.startswith("cuda")
        config = merged({
            "tensor_parallel": {"tp_size": tp},
            "dtype": TORCH_DTYPES[dtype],
            "replace_with_kernel_inject": on_gpu,
            "enable_cuda_graph": False,         # not supported with injection for this model (docs/STACK.md trap 4)
            "max_tokens": max_tokens,           # sized from the cases: the workspace must hold them
        }, engine_config)
        config["dtype"] = TORCH_DTYPES[dtype]   # a user's spelling of the same dtype ("fp16", "half")
        inject = on_gpu and bool(config["replace_with_kernel_inject"])   # kernels expected only if asked
        check_kernels_can_run(dtype, device)
        if tp > 1:
            raise BackendUnavailable(f"ds with tp={tp} runs under the DeepSpeed launcher (the tensor-parallel "
                                     "backend), not in the test process")
        compat.install()
        init_distributed_env()
        import deepspeed

        self.device = device
        before = gpu_used_bytes(device)
        model = load_hf_model(path, dtype, device if on_gpu else "cpu")
        total = len(model.gpt_neox.layers)
        engine = deepspeed.init_inference(model, config=config)
        self.model = engine
        report = count_injected(engine.module, total)
        if inject:
            require_injected(report, compat.transformers_version())
            engine_loaded()
            self.size_workspace(max_batch)
        self._injected = inject
        held = gpu_used_bytes(device) - before if on_gpu else None
        self.info = BackendInfo(
            backend="ds", dtype=dtype, device=device, tensor_parallel=tp,
            kernels=report.describe() if inject else "none (CPU: no kernel injection)" if not on_gpu
            else "none (replace_with_kernel_inject is off in the ds config)",
            gpu_memory_bytes=held, notes=[f"max_tokens={config['max_tokens']}",
                                          f"workspace sized for batch {max_batch}"]
            + (["user config merged over the defaults"] if engine_config else []))

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        self._release()
        if self._injected:
            engine_closed()

"""DeepSpeed inference (`deepspeed.init_inference`): the whole model on the GPU(s), kernel injection on
CUDA (verified), tensor parallel across GPUs. On a CPU-only machine it runs without injection, so the
plumbing is still exercised, and the report says so."""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from pytest_neoxmii import compat
from pytest_neoxmii.backends import planted_fault
from pytest_neoxmii.backends.base import BackendInfo, LoadRequest
from pytest_neoxmii.backends.hf import load_hf_model
from pytest_neoxmii.backends.torch_model import TorchModelBackend
from pytest_neoxmii.dtypes import TORCH_DTYPES
from pytest_neoxmii.errors import BackendUnavailable
from pytest_neoxmii.injection import count_injected, gpu_used_bytes, held_since, require_injected


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


_MASTER_PORT = None     # the rendezvous port's reservation, held for the process's life


def init_distributed_env(device: str) -> None:
    """A single-process torch.distributed world (DeepSpeed wants one even for tp=1 / ZeRO on one GPU,
    else it looks for mpi4py)."""
    global _MASTER_PORT
    import os
    if "MASTER_PORT" not in os.environ:
        # Reserved below the kernel's ephemeral range (deploy/ports.py), not a port the kernel gave a bind to
        # port 0: it hands those to outgoing connections at any moment, and in a cold session on one H200 one
        # took ZeRO's between the pick and the rendezvous's own bind (docs/STACK.md trap 25).
        from pytest_neoxmii.deploy import ports
        _MASTER_PORT = ports.reserve(1)
        os.environ["MASTER_PORT"] = str(_MASTER_PORT.ports[0])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    if not device.startswith("cuda") and os.environ["WORLD_SIZE"] == "1":
        skip_shared_memory_allreduce()


SHM_OP = "deepspeed_shm_comm"


def skip_shared_memory_allreduce() -> None:
    """DeepSpeed's CPU accelerator JIT-builds its shared-memory allreduce (deepspeed_shm_comm) whenever it
    sets up torch.distributed, a world of one process included: 23-62 s of compiling on a 2-core machine
    (docs/STACK.md trap 9), once per TORCH_EXTENSIONS_DIR. One rank has nothing to reduce with; marked
    incompatible, the op is not built and DeepSpeed's collectives go to gloo, which on one rank copies."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__[SHM_OP] = False     # DeepSpeed keeps this dict for the process


WORKSPACE_READINGS = 3      # release-and-retake cycles; each gives two readings (freed, then taken again)


def workspace_size(readings: list[int] | None) -> int | None:
    """The workspace's size from its readings (workspace_readings): their median."""
    return None if readings is None else int(statistics.median(readings))


def workspace_readings(device: str, readings: int = WORKSPACE_READINGS) -> list[int] | None:
    """What DeepSpeed's inference workspace on this process's GPU measures, once the first forward sized it;
    None without injected kernels. It is released and taken again (DeepSpeed's own release_workspace /
    retake_workspace, which its hybrid engine calls between training and generation), and what the driver got
    back, then gave out again, is its size, since cudaFree returns memory at once. The driver's figure is the
    whole GPU's, and the other engines' processes load beside this one: on one H200 (pythia-160m, synthetic
    weights) a single release read 772 MiB for a 792 MiB workspace in two sessions of two, another process
    having taken one of torch's 20 MiB segments meanwhile. So several readings are taken, each window one call
    long, and their median (workspace_size) is the figure; their spread, where wide, is said (spread_note).
    The registry's fit arithmetic counts the workspace (ModelSpec.ds_workspace_bytes); this is the figure that
    arithmetic is checked against."""
    if not device.startswith("cuda"):
        return None
    from deepspeed.model_implementations.transformers.ds_transformer import DeepSpeedTransformerInference
    workspace = DeepSpeedTransformerInference.workspace
    if workspace is None:
        return None
    return _workspace_readings(workspace, lambda: gpu_used_bytes(device), readings)


def spread_note(readings: list[int] | None, whose: str = "") -> list[str]:
    """A note for the report where the readings disagree by more than a driver page or two: the sign that
    another process allocated or freed on the GPU while the workspace was measured."""
    if not readings or max(readings) - min(readings) <= 4 * 2**20:
        return []
    return [f"{whose}DeepSpeed workspace readings {min(readings) / 2**20:.0f}-{max(readings) / 2**20:.0f} MiB "
            f"(the GPU's other processes moved the driver's figure meanwhile; the median is taken)"]


def _workspace_readings(workspace, used_bytes, readings: int) -> list[int]:
    """What each release frees and each retake takes, `readings` cycles of both."""
    sizes = []
    for _ in range(readings):
        held = used_bytes()
        workspace.release_workspace()
        released = used_bytes()
        if not workspace.retake_workspace():
            raise RuntimeError(f"DeepSpeed could not take back its {(held - released) / 2**20:.0f} MiB "
                               "inference workspace after it was measured")
        sizes += [held - released, used_bytes() - released]
    return sizes


class KernelInjectedBackend(TorchModelBackend):
    """A DeepSpeed inference engine (ds, and the model inside an MII NON_PERSISTENT deployment), loaded in its
    own worker process (isolated): kernel injection verified where asked, the workspace sized by the first
    forward. DeepSpeed's process-wide workspace and globals end with the worker."""

    needs_deepspeed = True
    injects_kernels = True
    worker_imports = (*TorchModelBackend.worker_imports, "deepspeed")
    isolated = True
    requires = ("deepspeed",)
    workspace_bytes: int | None = None      # DeepSpeed's workspace, measured by _verify_kernels where injected
    workspace_readings: list[int] | None = None    # what its median was taken of

    @classmethod
    def check_can_run(cls, request: LoadRequest) -> None:
        check_kernels_can_run(request.dtype, request.device)

    @classmethod
    def load(cls, request: LoadRequest) -> "KernelInjectedBackend":
        r = request
        return cls(r.path, r.dtype, r.device, r.tp, r.max_tokens, r.max_batch, engine_config=r.engine_config)

    def _verify_kernels(self, module, *, inject: bool, on_gpu: bool, max_batch: int, config_name: str) -> str:
        """The kernels as the report says them. Where injection was asked, every layer must have it (else
        InjectionFailed), and the first forward sizes the workspace for the largest batch."""
        report = count_injected(module, len(module.gpt_neox.layers))
        if not inject:
            return ("none (CPU: no kernel injection)" if not on_gpu
                    else f"none (replace_with_kernel_inject is off in the {config_name} config)")
        require_injected(report, compat.transformers_version())
        self.size_workspace(max_batch)
        self.workspace_readings = workspace_readings(self.device)
        self.workspace_bytes = workspace_size(self.workspace_readings)
        return report.describe()

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        self._release()


class DeepSpeedBackend(KernelInjectedBackend):
    description = "DeepSpeed inference, kernel injection (init_inference; tp >= 2: under the DeepSpeed launcher)"
    label = "DeepSpeed inference"
    colour = "#1f77b4"

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
                                     "backend), not in one process")
        compat.install()
        init_distributed_env(device)
        import deepspeed

        self.device = device
        before = gpu_used_bytes(device)
        model = load_hf_model(path, dtype, device if on_gpu else "cpu")
        self.model = deepspeed.init_inference(model, config=config)
        planted = planted_fault.plant(self.model.module)   # a validation run's planted defect; nothing when unset
        kernels = self._verify_kernels(self.model.module, inject=inject, on_gpu=on_gpu, max_batch=max_batch,
                                       config_name="ds")
        held, measured = held_since(device, before)
        self.info = BackendInfo(
            backend="ds", dtype=dtype, device=device, tensor_parallel=tp, kernels=kernels,
            gpu_memory_bytes=held, gpu_tensor_bytes=torch.cuda.memory_allocated(device) if on_gpu else None,
            workspace_bytes=self.workspace_bytes,
            notes=[f"max_tokens={config['max_tokens']}", f"workspace sized for batch {max_batch}"]
            + ([measured] if measured else []) + spread_note(self.workspace_readings)
            + (["user config merged over the defaults"] if engine_config else []) + planted_fault.note(planted))
